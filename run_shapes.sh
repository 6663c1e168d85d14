#!/usr/bin/env bash
# The main job on the embedded default: data -> teacher -> DPT -> DFT -> SFT (and the same steps without a teacher,
# the "SFT only" baseline) -> evaluation of the three models, one table. Uses CUDA when present (bf16), else the CPU.
# The data (the world, its vision tower and test sets) lives in out/shapes; the checkpoints and the evaluation go
# under the root $OUT: out/shapes by default (the paths config/shapes_*.py name). Extra arguments are passed to every
# training stage, e.g. a smoke test:
#   bash run_shapes.sh --max_steps=50
# and then, as they make other runs, $OUT defaults to a root of their own (here out/shapes_max_steps_50), so that
# they neither resume nor block the default run's checkpoints. OUT=<folder> bash run_shapes.sh ... names the root.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
EXTRA=("$@")
if [ ${#EXTRA[@]} -eq 0 ]; then
    OUT=${OUT:-out/shapes}
else
    tag=$(printf '%s' "${EXTRA[*]}" | tr -c 'A-Za-z0-9._-' '_' | sed 's/^[-_]*//' | cut -c1-80)
    OUT=${OUT:-out/shapes_$tag}
fi
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
trap 'echo "run_shapes.sh: a step failed (above); runs with other settings go to a root of their own: OUT=<folder> bash run_shapes.sh ..." >&2' ERR

stamp "1/6 data: the shapes world and its pretrained vision tower (out/shapes); checkpoints and evaluation in $OUT"
# (also when a test file is missing: generation is deterministic, so the files already there come out the same)
[ -f out/shapes/vision_tower/model.safetensors ] && [ -f out/shapes/test/reefknot/YESNO.jsonl ] || $PY shapes.py

stamp "2/6 teacher (6x256 LM from scratch on the frozen tower, told where to look: privileged.py): captions +"\
" instructions, then instruction tuning"
$PY train_sft.py config/shapes_teacher.py --out_dir="$OUT/teacher_pt" "${EXTRA[@]}"
$PY train_sft.py config/shapes_teacher.py config/shapes_teacher_it.py --init_from="$OUT/teacher_pt" \
    --out_dir="$OUT/teacher" "${EXTRA[@]}"

stamp "3/6 CompoDistill student: DPT (LM + KD, TAF) -> DFT (LM + KD + VAT) -> SFT (LM)"
T=(--teacher="$OUT/teacher")
$PY train_dpt.py config/shapes_dpt.py "${T[@]}" --out_dir="$OUT/dpt" "${EXTRA[@]}"
$PY train_dft.py config/shapes_dft.py "${T[@]}" --init_from="$OUT/dpt" --out_dir="$OUT/dft" "${EXTRA[@]}"
$PY train_sft.py config/shapes_sft.py --init_from="$OUT/dft" --out_dir="$OUT/sft" "${EXTRA[@]}"

stamp "4/6 baseline student: the same data and steps, no teacher (no KD, no VAT, no TAF)"
NOKD=(--kd_weight=0 --vat_weight=0 --taf=False)
$PY train_dpt.py config/shapes_dpt.py "${T[@]}" --out_dir="$OUT/base_dpt" "${NOKD[@]}" "${EXTRA[@]}"
$PY train_dft.py config/shapes_dft.py "${T[@]}" --init_from="$OUT/base_dpt" --out_dir="$OUT/base_dft" "${NOKD[@]}" \
    "${EXTRA[@]}"
$PY train_sft.py config/shapes_sft.py --init_from="$OUT/base_dft" --out_dir="$OUT/base_sft" "${EXTRA[@]}"

stamp "5/6 evaluation: teacher, SFT-only student, CompoDistill student"
$PY evaluate.py --compare="teacher=$OUT/teacher,sft_only=$OUT/base_sft,compodistill=$OUT/sft" \
    --teacher="$OUT/teacher" --out="$OUT/eval" --heatmaps=4 --batch_size=64

stamp "6/6 done: results in $OUT/eval (report.md, report.json, heat maps)"
