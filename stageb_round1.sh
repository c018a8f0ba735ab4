#!/usr/bin/env bash
# Stage B round 1: Bayesian fine-tuning of fc1/fc2 from a Stage A run (no pruning), into RUN_DIR/stageB1.
# Usage: START_CKPT=runs/full/stageA bash stageb_round1.sh   (default START_CKPT: RUN_DIR/stageA; see train_sparse.sh)
set -euo pipefail
# shellcheck source=pipeline_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_common.sh"
launch_pipeline --stages B1 "$@"
