# shellcheck shell=bash
# Shared by train_sparse.sh, stageb_round1.sh and stageb_round2.sh (sourced, not run): every setting lives in
# presets/*.json and finetune_sparse.py; this file only launches `finetune_sparse.py pipeline`, under torchrun
# when NPROC > 1. EXTRA_ARGS (split on white space) are options of every training stage.
: "${PRESET:=full}" "${NPROC:=1}" "${EXTRA_ARGS:=}"
export PRESET
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

launch_pipeline() {
  local extra_args
  read -ra extra_args <<< "$EXTRA_ARGS"
  # The +-expansion keeps an empty array safe under `set -u` in bash < 4.4 (macOS ships 3.2).
  if [ "$NPROC" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NPROC" "$here/finetune_sparse.py" pipeline "$@" ${extra_args[@]+"${extra_args[@]}"}
  else
    python "$here/finetune_sparse.py" pipeline "$@" ${extra_args[@]+"${extra_args[@]}"}
  fi
}
