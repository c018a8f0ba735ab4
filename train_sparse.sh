#!/usr/bin/env bash
# The whole pipeline: Stage A (deterministic) -> Stage B round 1 (Bayesian) -> Stage B round 2 (pruning), each
# over CV_SPLITS folds, then a summary of every stage on its out-of-fold validation cells and the path of the
# final model: the run directory of round 2, an ensemble of the fold models that predict_updated.py averages.
# With PREDICT_PATH=new.h5ad the final model also predicts those cells (PREDICT_LABEL_KEY: evaluate on them).
#
#   bash train_sparse.sh          scBERT's configuration (GPU box); NPROC=4 bash train_sparse.sh for 4 GPUs
#   bash train_sparse.sh demo     a small configuration for the bundled PBMC data on a laptop CPU
# Every setting is an environment variable (see pipeline_common.sh), e.g. DATA_PATH=my.h5ad LABEL_KEY=celltype.
# Extra arguments go to every finetune_sparse.py call (e.g. --overwrite or --resume).
set -euo pipefail
if [ "${1:-}" = demo ]; then export PRESET=demo; shift; fi
# shellcheck source=pipeline_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_common.sh"
export PRESET DIM DEPTH HEADS DIM_HEAD H_DIM BATCH_SIZE GRAD_ACC LEARNING_RATE EPOCHS_A EPOCHS_B PRE_WARM_EPOCHS \
  KL_ANNEAL_STEPS LEARNING_RATE_B INIT_LOG_SIGMA PRIOR_SIGMA PRUNE_TARGET PRUNE_STEP PRUNE_FT_EPOCHS PATIENCE DATA_PATH LABEL_KEY RUN_DIR SEED NPROC DEVICE \
  BIN_NUM BIN_WIDTH KL_WEIGHT MC_SAMPLES PRUNE_F1_TOL PRUNE_MODE PRUNE_DIM PRUNE_LAYERS EXTRA_ARGS CV_SPLITS SELECT_METRIC CLASS_WEIGHT \
  TEMPERATURE_SCALING DROPOUT PREDICT_PATH PREDICT_LABEL_KEY PRUNE_RULE PRUNE_NLL_TOL PRUNE_MAX_CHANGED PRUNE_SCORE PRUNE_DISTILL GROUP_LASSO PRUNE_REFIT

echo "== Stage A: deterministic encoder + head ($PRESET configuration, $CV_SPLITS fold(s)) =="
launch finetune_sparse.py "${COMMON_ARGS[@]}" --dim "$DIM" --depth "$DEPTH" --heads "$HEADS" --dim_head "$DIM_HEAD" \
  --h_dim "$H_DIM" --dropout "$DROPOUT" --bin_num "$BIN_NUM" --bin_width "$BIN_WIDTH" --learning_rate "$LEARNING_RATE" \
  --epoch "$EPOCHS_A" --prune_target 0 --ckpt_dir "$RUN_DIR/stageA" --model_name stageA "$@"

# Each stage continues the previous one fold by fold: fold k of Stage B starts from fold k of Stage A and is
# validated on the same cells, so every fold model is judged on cells it never trained on.
echo "== Stage B round 1: Bayesian head =="
START_CKPT="$RUN_DIR/stageA" bash "$here/stageb_round1.sh" "$@"

echo "== Stage B round 2: progressive structured pruning =="
START_CKPT="$RUN_DIR/stageB1" bash "$here/stageb_round2.sh" "$@"

final_model="$RUN_DIR/stageB2"
if [ -n "$PREDICT_PATH" ]; then
  echo "== Prediction on $PREDICT_PATH with $MC_SAMPLES Monte Carlo samples per fold model =="
  predict_args=(--model_path "$final_model" --data_path "$PREDICT_PATH" --bayes_mc_samples "$MC_SAMPLES" --seed "$SEED"
    --output_dir "$RUN_DIR/predictions" --device "$DEVICE" --overwrite)
  [ -n "$PREDICT_LABEL_KEY" ] && predict_args+=(--label_key "$PREDICT_LABEL_KEY")
  python "$here/predict_updated.py" "${predict_args[@]}"
fi

echo "== Summary: out-of-fold validation (each cell predicted by the fold model that never trained on it) =="
python - "$RUN_DIR" <<'PY'
import csv, json, os, sys
import numpy as np
from sklearn.metrics import accuracy_score, f1_score
run_dir = sys.argv[1]
print(f"{'stage':<10}{'cells':>7}{'accuracy':>10}{'macro-F1':>10}{'NLL':>8}{'ECE':>8}{'params':>10}{'head sparsity':>15}{'ckpt MB':>9}")
for stage in ("stageA", "stageB1", "stageB2"):
    directory = os.path.join(run_dir, stage)
    with open(os.path.join(directory, f"{stage}_summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    folds = len(summary["folds"])
    true, pred = [], []
    for fold in range(folds):
        with open(os.path.join(directory, f"{stage}{fold}_val_predictions.csv"), encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                true.append(row["true_label"])
                pred.append(row["pred_label"])
    mb = sum(os.path.getsize(os.path.join(directory, f"{stage}{fold}_best.pth")) for fold in range(folds)) / 2**20
    print(f"{stage:<10}{len(true):>7}{accuracy_score(true, pred):>10.4f}{f1_score(true, pred, average='macro'):>10.4f}"
          f"{summary['nll']['mean']:>8.4f}{summary['ece']['mean']:>8.4f}{int(summary['total_params']['mean']):>10d}"
          f"{summary['head_sparsity']['mean']:>15.1%}{mb:>9.2f}")
PY
echo "final model: $final_model"
echo "predict new cells with: python predict_updated.py --model_path '$final_model' --data_path NEW.h5ad --bayes_mc_samples $MC_SAMPLES"
