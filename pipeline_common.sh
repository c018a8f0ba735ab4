# shellcheck shell=bash
# Settings and helpers shared by train_sparse.sh, stageb_round1.sh and stageb_round2.sh (sourced, not run).
# Every setting is an environment variable with a default; PRESET=demo selects a small CPU configuration.

PRESET="${PRESET:-full}"
case "$PRESET" in
  demo)  # the bundled PBMC data on 2 CPU cores in a few minutes
    : "${DIM:=32}" "${DEPTH:=1}" "${HEADS:=2}" "${DIM_HEAD:=16}" "${H_DIM:=32}"
    : "${BATCH_SIZE:=16}" "${GRAD_ACC:=1}" "${LEARNING_RATE:=1e-3}"
    : "${EPOCHS_A:=12}" "${EPOCHS_B:=4}" "${PRE_WARM_EPOCHS:=1}" "${KL_ANNEAL_STEPS:=100}"
    # Stage B starts from a trained model: a 5x smaller step keeps what Stage A learned. A wider initial
    # posterior (sigma e^-4), a narrower prior (0.05) and a stronger KL (1e-3, still far below the 1/cells of a
    # full ELBO) give the small head weight uncertainty within 4 epochs (benchmarks/accuracy_calibration.py).
    : "${LEARNING_RATE_B:=2e-4}" "${INIT_LOG_SIGMA:=-4}" "${PRIOR_SIGMA:=0.05}" "${KL_WEIGHT:=1e-3}"
    # Pruning (inner splits, benchmarks/pruning_tradeoff.py): the refit keeps what the head computes, and a
    # fine-tuning epoch after it only moved calls (folds then stopped at 0-30 %, most at 0). On ~90-112 validation
    # cells the bootstrap bound of the NLL change is about +-0.03 wide: a 0.02 tolerance gave mean levels of
    # 40-44 %, 0.05 gave 46-50 % at the same inner-test cost (NLL +0.004 vs +0.005, macro-F1 -0.003 for both,
    # averaged over 4 inner splits). Aiming at 60 % rather than 50 % (inner splits of seeds 11-14 again): every
    # split then ends at >= 50 % although the rule stops some folds at 40-50 % (55-61 % of fc1+fc2 weights
    # removed vs 49-51 %), at no extra inner-test cost (NLL +0.009 vs +0.015, macro-F1 -0.003 vs -0.017).
    # Only fc1's neurons go (fc2 loses the inputs that read them): fc2's own 32 neurons, the bottleneck before the
    # classes, hold 4 % of the fc1+fc2 weights. Same inner splits: NLL +0.004 vs +0.009 with fc2's neurons pruned
    # too (lower on each of the 4 splits), 2.2 % vs 2.7 % of calls changed, macro-F1 -0.005 vs -0.003.
    : "${PRUNE_LAYERS:=fc1}"
    : "${PRUNE_TARGET:=0.6}" "${PRUNE_STEP:=0.1}" "${PRUNE_FT_EPOCHS:=0}" "${PRUNE_NLL_TOL:=0.05}" "${PRUNE_F1_TOL:=0.03}"
    : "${PATIENCE:=4}"
    # Chosen by validation inside training cells (benchmarks/accuracy_calibration.py says how): 5 cross-fitted
    # folds use every cell and average 5 models; 0.25-wide bins resolve the 0.7-2 range where most non-zero
    # log-expression values lie (scBERT's 1-wide bins put two thirds of them into one token). The ensemble pools
    # its members geometrically, which calibrates it; per-member temperatures added nothing on top.
    : "${CV_SPLITS:=5}" "${BIN_NUM:=28}" "${BIN_WIDTH:=0.25}" "${DROPOUT:=0}" "${TEMPERATURE_SCALING:=0}" ;;
  full)  # scBERT's configuration, for a GPU box
    : "${DIM:=200}" "${DEPTH:=6}" "${HEADS:=10}" "${DIM_HEAD:=64}" "${H_DIM:=128}"
    : "${BATCH_SIZE:=3}" "${GRAD_ACC:=60}" "${LEARNING_RATE:=1e-4}"
    : "${EPOCHS_A:=100}" "${EPOCHS_B:=20}" "${PRE_WARM_EPOCHS:=1}" "${KL_ANNEAL_STEPS:=10000}"
    : "${LEARNING_RATE_B:=1e-4}" "${INIT_LOG_SIGMA:=-5}" "${PRIOR_SIGMA:=0.1}" "${KL_WEIGHT:=1e-6}"
    : "${PRUNE_TARGET:=0.3}" "${PRUNE_STEP:=0.1}" "${PRUNE_FT_EPOCHS:=4}" "${PRUNE_F1_TOL:=0.01}" "${PATIENCE:=10}"
    # scBERT's binning (its pretrained weights expect it) and one 80/20 split.
    : "${CV_SPLITS:=1}" "${BIN_NUM:=5}" "${BIN_WIDTH:=1}" "${DROPOUT:=0}" "${TEMPERATURE_SCALING:=0}" ;;
  *) echo "error: PRESET must be demo or full, got '$PRESET'" >&2; exit 2 ;;
esac
: "${DATA_PATH:=}" "${LABEL_KEY:=cell_type}" "${RUN_DIR:=runs/$PRESET}" "${SEED:=2021}" "${NPROC:=1}"
: "${DEVICE:=auto}" "${MC_SAMPLES:=8}" "${PREDICT_PATH:=}" "${PREDICT_LABEL_KEY:=}"
: "${SELECT_METRIC:=nll}" "${CLASS_WEIGHT:=balanced}" "${PRUNE_RULE:=paired}" "${PRUNE_NLL_TOL:=0.02}" "${PRUNE_MAX_CHANGED:=0.05}"
: "${PRUNE_MODE:=physical}" "${PRUNE_DIM:=0}" "${PRUNE_LAYERS:=fc1,fc2}" "${PRUNE_SCORE:=l2}" "${PRUNE_DISTILL:=0}" "${GROUP_LASSO:=0}" "${PRUNE_REFIT:=1}"
: "${EXTRA_ARGS:=}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Stage B options shared by both rounds (the learning rate of Stage A comes from LEARNING_RATE).
# shellcheck disable=SC2034  # used by the scripts that source this file
# The posterior's initial width and the prior are set when round 1 ports the head (stageb_round1.sh); round 2
# continues a Bayesian checkpoint, which fixes both.
# GROUP_LASSO acts in both rounds: round 1 trains the neurons pruning will remove toward zero.
STAGE_B_ARGS=(--bayes_head --learning_rate "$LEARNING_RATE_B" --kl_weight "$KL_WEIGHT" --kl_anneal_steps "$KL_ANNEAL_STEPS"
  --group_lasso "$GROUP_LASSO" --prune_dim "$PRUNE_DIM" --prune_layers "$PRUNE_LAYERS")

# Runs a Python script of the project, under torchrun when NPROC > 1.
launch() {
  local script="$1"; shift
  if [ "$NPROC" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NPROC" "$here/$script" "$@"
  else
    python "$here/$script" "$@"
  fi
}

# Options every stage shares; a stage adds its own. EXTRA_ARGS is split on white space.
COMMON_ARGS=(--label_key "$LABEL_KEY" --seed "$SEED" --device "$DEVICE" --cv_splits "$CV_SPLITS"
  --batch_size "$BATCH_SIZE" --grad_acc "$GRAD_ACC" --patience "$PATIENCE" --mc_samples_eval "$MC_SAMPLES"
  --select_metric "$SELECT_METRIC" --class_weight "$CLASS_WEIGHT")
if [ "$TEMPERATURE_SCALING" = 1 ]; then COMMON_ARGS+=(--temperature_scaling); fi
if [ -n "$DATA_PATH" ]; then COMMON_ARGS+=(--data_path "$DATA_PATH"); fi
read -ra extra_args <<< "$EXTRA_ARGS"
# The +-expansion keeps an empty array safe under `set -u` in bash < 4.4 (macOS ships 3.2).
COMMON_ARGS+=(${extra_args[@]+"${extra_args[@]}"})

# START_CKPT is one checkpoint file or a run directory holding the fold models (*_best.pth) of a --cv_splits run.
require_checkpoint() {
  local start="${1:-}"
  if [ -n "$start" ] && { [ -f "$start" ] || compgen -G "$start/*_best.pth" > /dev/null; }; then
    return 0
  fi
  echo "error: START_CKPT='$start' is not a checkpoint file or a run directory with *_best.pth files; set START_CKPT to a finetune_sparse.py *_best.pth or --ckpt_dir" >&2
  exit 2
}
