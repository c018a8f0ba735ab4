"""A labelled stand-in for data the presets were not tuned on: the bundled cells re-expressed on another scale.

The demo preset was chosen on the bundled PBMC cells, log-normalized (values 0-7). Users bring counts per million,
TPM or FPKM without a log, and gene panels of another size. The stand-in makes such data from the same labelled
cells, so the truth is known: values on the linear counts-per-million scale (expm1 of the log-normalized values,
times 100: up to ~10^5, no log), a random 15 % of the genes removed and 250 all-zero genes added (genes a panel
measures but these cells never express), shuffled in among the others. Nothing in it can be read on the old scale:
fixed-width bins would put nearly every non-zero value into the last bin.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from utils import ExpressionData

CPM_PER_NORMALIZED = 1e6 / 1e4  # the bundled values are log1p of counts per 10^4
DROPPED_GENES = 0.15
ZERO_GENES = 250


def cpm_standin(data: ExpressionData, seed: int = 0) -> ExpressionData:
    """The same cells and labels as `data` (log-normalized), as linear CPM over another gene panel."""
    rng = np.random.default_rng(seed)
    matrix = sp.csr_matrix(data.matrix, dtype=np.float64, copy=True)
    matrix.data = np.expm1(matrix.data) * CPM_PER_NORMALIZED
    n_genes = matrix.shape[1]
    kept = np.sort(rng.choice(n_genes, n_genes - round(DROPPED_GENES * n_genes), replace=False))
    matrix = sp.hstack([matrix[:, kept], sp.csr_matrix((matrix.shape[0], ZERO_GENES))], format="csr")
    genes = [data.genes[i] for i in kept] + [f"ZERO{i:04d}" for i in range(ZERO_GENES)]
    order = rng.permutation(len(genes))
    return ExpressionData(sp.csr_matrix(matrix[:, order], dtype=np.float32), [genes[i] for i in order],
                          list(data.cell_ids), data.labels, data.adata)


def baseline_features(name: str, x: np.ndarray | sp.spmatrix) -> np.ndarray | sp.spmatrix:
    """What the baselines (and the over-clustering of majority voting) see: log1p of the stand-in's linear values,
    as a user would apply before logistic regression; the bundled data's log-normalized values as they are."""
    if name != "standin":
        return x
    return sp.csr_matrix(x).log1p() if sp.issparse(x) else np.log1p(x)
