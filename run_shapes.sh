#!/usr/bin/env bash
# The main job on the embedded default: data -> teacher -> DPT -> DFT -> SFT (and the same steps
# without a teacher, the "SFT only" baseline) -> evaluation of the three models, one table.
# Uses CUDA when present (bf16), else the CPU. Everything goes under $OUT (default out/shapes).
# Extra arguments are passed to every training stage, e.g.  bash run_shapes.sh --max_steps=50
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
OUT=${OUT:-out/shapes}
EXTRA=("$@")
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
D="--data=$OUT"

stamp "1/6 data: the shapes world and its pretrained vision tower"
[ -f "$OUT/vision_tower/model.safetensors" ] || $PY shapes.py --out="$OUT"

stamp "2/6 teacher (6x256 LM from scratch on the frozen tower, captions + instructions)"
$PY train_sft.py config/shapes_teacher.py --out_dir="$OUT/teacher" --vision_model="$OUT/vision_tower" \
    --data="$OUT/pretrain.json,$OUT/instruct.json" "${EXTRA[@]}"

stamp "3/6 CompoDistill student: DPT (LM + KD, TAF) -> DFT (LM + KD + VAT) -> SFT (LM)"
$PY train_dpt.py config/shapes_dpt.py --teacher="$OUT/teacher" --out_dir="$OUT/dpt" --data="$OUT/pretrain.json" "${EXTRA[@]}"
$PY train_dft.py config/shapes_dft.py --teacher="$OUT/teacher" --init_from="$OUT/dpt" --out_dir="$OUT/dft" \
    --data="$OUT/instruct.json" "${EXTRA[@]}"
$PY train_sft.py config/shapes_sft.py --init_from="$OUT/dft" --out_dir="$OUT/sft" --data="$OUT/instruct.json" "${EXTRA[@]}"

stamp "4/6 baseline student: the same data and steps, no teacher (no KD, no VAT, no TAF)"
NOKD=(--kd_weight=0 --vat_weight=0 --taf=False)
$PY train_dpt.py config/shapes_dpt.py --teacher="$OUT/teacher" --out_dir="$OUT/base_dpt" --data="$OUT/pretrain.json" \
    "${NOKD[@]}" "${EXTRA[@]}"
$PY train_dft.py config/shapes_dft.py --init_from="$OUT/base_dpt" --out_dir="$OUT/base_dft" --data="$OUT/instruct.json" \
    "${NOKD[@]}" "${EXTRA[@]}"
$PY train_sft.py config/shapes_sft.py --init_from="$OUT/base_dft" --out_dir="$OUT/base_sft" --data="$OUT/instruct.json" \
    "${EXTRA[@]}"

stamp "5/6 evaluation: teacher, SFT-only student, CompoDistill student"
$PY evaluate.py --compare="teacher=$OUT/teacher,sft_only=$OUT/base_sft,compodistill=$OUT/sft" \
    --teacher="$OUT/teacher" --data="$OUT" --out="$OUT/eval" --heatmaps=4

stamp "6/6 done: results in $OUT/eval (report.md, report.json, heat maps)"
