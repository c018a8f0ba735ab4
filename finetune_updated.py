"""Baseline scBERT fine-tuning: deterministic head, no Bayesian layers, no pruning, 5 stratified folds.

The same program as finetune_sparse.py (one training loop in the project) with the baseline's defaults;
every option of finetune_sparse.py is accepted.
"""

import sys

from finetune_sparse import main

BASELINE_DEFAULTS = {"bayes_head": False, "prune_target": 0.0, "cv_splits": 5, "model_name": "finetune_baseline"}

if __name__ == "__main__":
    sys.exit(main(description=__doc__, **BASELINE_DEFAULTS))
