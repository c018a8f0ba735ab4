#!/usr/bin/env bash
# The whole pipeline: Stage A (deterministic) -> Stage B round 1 (Bayesian) -> Stage B round 2 (pruning)
# -> prediction with Monte Carlo samples on Stage A's validation cells (never trained on, but used for early
# stopping and pruning decisions), then a summary table per stage.
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
  BIN_NUM KL_WEIGHT MC_SAMPLES PRUNE_F1_TOL PRUNE_MODE PRUNE_DIM PRUNE_LAYERS EXTRA_ARGS

echo "== Stage A: deterministic encoder + head ($PRESET configuration) =="
launch finetune_sparse.py "${COMMON_ARGS[@]}" --dim "$DIM" --depth "$DEPTH" --heads "$HEADS" --dim_head "$DIM_HEAD" \
  --h_dim "$H_DIM" --learning_rate "$LEARNING_RATE" --epoch "$EPOCHS_A" --prune_target 0 --ckpt_dir "$RUN_DIR/stageA" --model_name stageA "$@"

echo "== Stage B round 1: Bayesian head =="
START_CKPT="$RUN_DIR/stageA/stageA0_best.pth" bash "$here/stageb_round1.sh" "$@"

echo "== Stage B round 2: progressive structured pruning =="
START_CKPT="$RUN_DIR/stageB1/stageB10_best.pth" bash "$here/stageb_round2.sh" "$@"

echo "== Prediction on Stage A's validation cells (never trained on) with $MC_SAMPLES Monte Carlo samples =="
predict_args=(--model_path "$RUN_DIR/stageB2/stageB20_best.pth" --bayes_mc_samples "$MC_SAMPLES" --seed "$SEED"
  --cells "$RUN_DIR/stageA/stageA0_val_cells.txt" --label_key "$LABEL_KEY" --output_dir "$RUN_DIR/predictions"
  --device "$DEVICE" --overwrite)
[ -n "$DATA_PATH" ] && predict_args+=(--data_path "$DATA_PATH")
python "$here/predict_updated.py" "${predict_args[@]}"

echo "== Summary =="
python - "$RUN_DIR" <<'PY'
import json, os, sys
run_dir = sys.argv[1]
print(f"{'stage':<10}{'accuracy':>10}{'macro-F1':>10}{'ECE':>8}{'params':>10}{'head sparsity':>15}{'ckpt MB':>9}")
for stage in ("stageA", "stageB1", "stageB2"):
    with open(os.path.join(run_dir, stage, f"{stage}_summary.json"), encoding="utf-8") as handle:
        fold = json.load(handle)["folds"][0]
    mb = os.path.getsize(os.path.join(run_dir, stage, f"{stage}0_best.pth")) / 2**20
    print(f"{stage:<10}{fold['accuracy']:>10.4f}{fold['macro_f1']:>10.4f}{fold['ece']:>8.4f}"
          f"{fold['total_params']:>10d}{fold['head_sparsity']:>15.1%}{mb:>9.2f}")
with open(os.path.join(run_dir, "predictions", "metrics.json"), encoding="utf-8") as handle:
    held_out = json.load(handle)
print(f"validation-cell prediction (stage B2, MC samples): accuracy {held_out['accuracy']:.4f}, "
      f"macro-F1 {held_out['macro_f1']:.4f}, ECE {held_out['ece']:.4f}")
PY
