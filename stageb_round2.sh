#!/usr/bin/env bash
# Stage B round 2: progressive structured pruning of a Bayesian run, into RUN_DIR/stageB2; after each step the next
# layer is refitted and the level kept or refused by the paired rule (settings: the preset's B2 stage).
# Usage: START_CKPT=runs/full/stageB1 bash stageb_round2.sh   (default START_CKPT: RUN_DIR/stageB1; see train_sparse.sh)
set -euo pipefail
# shellcheck source=pipeline_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_common.sh"
launch_pipeline --stages B2 "$@"
