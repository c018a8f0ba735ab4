#!/usr/bin/env bash
# Stage B round 2: progressive structured pruning of a Bayesian checkpoint; after each step the next layer is
# refitted (PRUNE_REFIT=1) and the model fine-tuned for PRUNE_FT_EPOCHS, then kept or refused by the paired rule.
# Usage: START_CKPT=runs/full/stageB1 bash stageb_round2.sh   (a round 1 run directory or one *_best.pth; settings: see pipeline_common.sh)
set -euo pipefail
# shellcheck source=pipeline_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_common.sh"
require_checkpoint "${START_CKPT:-}"
refit_flag=--prune_refit
if [ "$PRUNE_REFIT" != 1 ]; then refit_flag=--no-prune_refit; fi
launch finetune_sparse.py "${COMMON_ARGS[@]}" "${STAGE_B_ARGS[@]}" --model_path "$START_CKPT" --epoch 0 \
  --prune_target "$PRUNE_TARGET" --prune_step "$PRUNE_STEP" --prune_ft_epochs "$PRUNE_FT_EPOCHS" \
  --prune_rule "$PRUNE_RULE" --prune_nll_tol "$PRUNE_NLL_TOL" --prune_max_changed "$PRUNE_MAX_CHANGED" --prune_f1_tol "$PRUNE_F1_TOL" --prune_mode "$PRUNE_MODE" \
  --prune_score "$PRUNE_SCORE" --prune_distill "$PRUNE_DISTILL" "$refit_flag" \
  --ckpt_dir "$RUN_DIR/stageB2" --model_name stageB2 "$@"
