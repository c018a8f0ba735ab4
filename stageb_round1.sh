#!/usr/bin/env bash
# Stage B round 1: Bayesian fine-tuning of fc1/fc2 from a Stage A checkpoint (no pruning).
# Usage: START_CKPT=runs/full/stageA bash stageb_round1.sh   (a Stage A run directory or one *_best.pth; settings: see pipeline_common.sh)
set -euo pipefail
# shellcheck source=pipeline_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_common.sh"
require_checkpoint "${START_CKPT:-}"
launch finetune_sparse.py "${COMMON_ARGS[@]}" "${STAGE_B_ARGS[@]}" --model_path "$START_CKPT" \
  --init_log_sigma "$INIT_LOG_SIGMA" --prior_sigma "$PRIOR_SIGMA" --epoch "$EPOCHS_B" --pre_warm_epochs "$PRE_WARM_EPOCHS" --prune_target 0 \
  --ckpt_dir "$RUN_DIR/stageB1" --model_name stageB1 "$@"
