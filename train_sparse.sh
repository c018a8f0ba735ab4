#!/usr/bin/env bash
# The whole pipeline: Stage A (deterministic) -> Stage B round 1 (Bayesian) -> Stage B round 2 (pruning), each over
# the preset's folds, then a summary of every stage on its out-of-fold validation cells and the path of the final
# model (RUN_DIR/stageB2, an ensemble of the fold models that predict_updated.py pools). It is
# `finetune_sparse.pipeline`: run again, it continues where it stopped (complete stages kept, an interrupted one
# resumed fold by fold); --overwrite starts over. With PREDICT_PATH=new.h5ad the final model annotates those cells.
#
#   bash train_sparse.sh          scBERT's configuration (GPU box); NPROC=4 bash train_sparse.sh for 4 GPUs
#   bash train_sparse.sh demo     a small configuration for the bundled PBMC data on a laptop CPU
# Settings: presets/*.json (print one with `python finetune_sparse.py pipeline --preset demo --print_preset`);
# environment variables override them (DATA_PATH, LABEL_KEY, RUN_DIR, EPOCHS_A, EPOCHS_B, DIM, ..., see
# finetune_sparse.ENV_OPTIONS), and extra arguments are options of every training stage (e.g. --seed 3).
set -euo pipefail
if [ "${1:-}" = demo ]; then export PRESET=demo; shift; fi
# shellcheck source=pipeline_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_common.sh"
launch_pipeline --stages A,B1,B2 "$@"
