#!/usr/bin/env bash
# The main job on data the project generates itself, through the real MONAI bundle CLI:
# synthetic HC18-layout dataset -> train -> evaluate (test split) -> inference on a folder -> TorchScript export.
#   bash scripts/demo.sh [WORK_DIR]        (EPOCHS, IMAGE_SIZE, NUM_IMAGES, BATCH_SIZE override the small defaults)
# The defaults fit a few minutes on 2 CPU cores and converge: 120 images at 128x128, batch 8 (about 11
# optimizer steps an epoch; with 40 images and batch 16 the network saw 2 steps an epoch and did not learn).
set -euo pipefail
work="$(mkdir -p "${1:-/tmp/custom_nets_demo}" && cd "${1:-/tmp/custom_nets_demo}" && pwd)"
epochs="${EPOCHS:-20}"
image_size="${IMAGE_SIZE:-128}"
num_images="${NUM_IMAGES:-120}"
batch_size="${BATCH_SIZE:-8}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
bundle="$repo/bundles/fetal_head_us_segmentation"
data="$work/hc18_synthetic"

# Outputs go under WORK_DIR (--bundle_root keeps the configs in the repo, models/ and eval/ out of it).
mkdir -p "$work/bundle"
cp -r "$bundle/configs" "$bundle/docs" "$work/bundle/"
cd "$work/bundle"
common=(--bundle_root "$work/bundle" --dataset_dir "$data" --image_size "$image_size" --num_workers 0)

echo "== 1/5 synthetic HC18-layout dataset: $data"
python -m custom_nets.data.synthetic_hc18 --output_dir "$data" --num_images "$num_images"

echo "== 2/5 training ($epochs epochs at ${image_size}x${image_size})"
python -m monai.bundle run training --config_file configs/train.json "${common[@]}" --train#trainer#max_epochs "$epochs" \
    --train#dataloader#batch_size "$batch_size"

echo "== 3/5 evaluation on the test split"
python -m monai.bundle run evaluating --config_file "['configs/train.json','configs/evaluate.json']" "${common[@]}"

echo "== 4/5 inference on a folder"
mkdir -p "$work/input"
cp "$data"/training_set/00[1-3]_HC.png "$work/input/"
python -m monai.bundle run inference --config_file configs/inference.json --bundle_root "$work/bundle" \
    --image_size "$image_size" --input_dir "$work/input" --output_dir "$work/predictions" \
    --pixel_size_csv "$data/training_set_pixel_size_and_HC.csv" --save_overlay true

echo "== 5/5 TorchScript export"
python -m monai.bundle ckpt_export --net_id network_def --filepath models/model.ts --ckpt_file models/model.pt \
    --meta_file configs/metadata.json --config_file configs/inference.json --bundle_root "$work/bundle"

echo "done: metrics in $work/bundle/eval/metrics_summary.csv, predictions and head_circumference.csv in $work/predictions, model in $work/bundle/models"
python - "$work" <<'PY'
import csv, sys
work = sys.argv[1]
rows = list(csv.DictReader(open(f"{work}/bundle/eval/metrics_per_case.csv")))
dice = sum(float(r["dice"]) for r in rows) / len(rows)
errors = [abs(float(r["hc_mm"]) - float(r["hc_ref_mm"])) / float(r["hc_ref_mm"]) for r in rows if r["hc_mm"]]
print(f"test split ({len(rows)} synthetic images): Dice {dice:.3f}, HC error {100 * sum(errors) / max(len(errors), 1):.1f}% "
      f"(mean of |HC - reference| / reference; {len(rows) - len(errors)} image(s) without an HC)")
PY
ls "$work"/predictions/*overlay* | head -1 | sed 's/^/overlay: /'
