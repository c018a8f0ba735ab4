"""Baseline scBERT fine-tuning: deterministic head, no Bayesian layers, no pruning, 5 stratified folds.

The same program as finetune_sparse.py (one training loop in the project) with the baseline's defaults;
every option of finetune_sparse.py is accepted.
"""

import sys

import finetune_sparse

BASELINE_DEFAULTS = {"bayes_head": False, "binning": "width", "prune_target": 0.0, "cv_splits": 5, "model_name": "finetune_baseline"}


def main(argv: list[str] | None = None) -> int:
    return finetune_sparse.main(argv, description=__doc__, **BASELINE_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
