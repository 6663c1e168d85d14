#!/usr/bin/env bash
# The main job on the embedded default: data -> teacher -> DPT -> DFT -> SFT (and the same steps without a teacher,
# the "SFT only" baseline) -> evaluation of the three models, one table. Uses CUDA when present (bf16), else the CPU.
# Everything goes under out/shapes: config/shapes_*.py say where each stage reads and writes; only the baseline's
# own directories are named here. Extra arguments are passed to every training stage, e.g.
#   bash run_shapes.sh --max_steps=50
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
EXTRA=("$@")
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

stamp "1/6 data: the shapes world and its pretrained vision tower"
# (also when a test file is missing: generation is deterministic, so the files already there come out the same)
[ -f out/shapes/vision_tower/model.safetensors ] && [ -f out/shapes/test/reefknot/YESNO.jsonl ] || $PY shapes.py

stamp "2/6 teacher (6x256 LM from scratch on the frozen tower, captions + instructions)"
$PY train_sft.py config/shapes_teacher.py "${EXTRA[@]}"

stamp "3/6 CompoDistill student: DPT (LM + KD, TAF) -> DFT (LM + KD + VAT) -> SFT (LM)"
$PY train_dpt.py config/shapes_dpt.py "${EXTRA[@]}"
$PY train_dft.py config/shapes_dft.py "${EXTRA[@]}"
$PY train_sft.py config/shapes_sft.py "${EXTRA[@]}"

stamp "4/6 baseline student: the same data and steps, no teacher (no KD, no VAT, no TAF)"
NOKD=(--kd_weight=0 --vat_weight=0 --taf=False)
$PY train_dpt.py config/shapes_dpt.py --out_dir=out/shapes/base_dpt "${NOKD[@]}" "${EXTRA[@]}"
$PY train_dft.py config/shapes_dft.py --init_from=out/shapes/base_dpt --out_dir=out/shapes/base_dft "${NOKD[@]}" \
    "${EXTRA[@]}"
$PY train_sft.py config/shapes_sft.py --init_from=out/shapes/base_dft --out_dir=out/shapes/base_sft "${EXTRA[@]}"

stamp "5/6 evaluation: teacher, SFT-only student, CompoDistill student"
$PY evaluate.py --compare="teacher=out/shapes/teacher,sft_only=out/shapes/base_sft,compodistill=out/shapes/sft" \
    --teacher=out/shapes/teacher --out=out/shapes/eval --heatmaps=4 --batch_size=64

stamp "6/6 done: results in out/shapes/eval (report.md, report.json, heat maps)"
