"""Majority voting: each cell also gets the label most of its cluster got (as CellTypist's `majority_voting`).

Clusters are the user's (an obs column) or an over-clustering computed here with scanpy's Leiden: many small
clusters, so a cluster holds cells of one type and voting only smooths out single cells' mistakes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils import UNASSIGNED, UserError, _preview

HVG_GENES = 2000  # genes kept for the PCA when the data has more (scanpy's usual choice)
PCA_COMPONENTS = 50
NEIGHBOURS = 15
# Leiden resolution by number of cells (CellTypist's over-clustering steps): more cells, finer clusters, so that a
# cluster stays a few dozen to a few hundred cells.
RESOLUTION_STEPS = ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0))
RESOLUTION_MAX = 30.0


def majority_vote(labels: Sequence[str] | np.ndarray, clusters: Sequence[str] | np.ndarray,
                  unassigned: str = UNASSIGNED) -> pd.DataFrame:
    """Each cell's cluster, the cluster's majority label and the cluster's agreement, one row per cell in order.

    The majority label is the label most cells of the cluster got, Unassigned counting as a label: a cluster whose
    most frequent label is Unassigned stays Unassigned (a type the model does not know shows as such). Ties go to an
    assigned label before Unassigned, then to the label first in alphabetical order. The agreement is the share of
    the cluster's cells whose own label is the majority label (8 A and 2 B: A, 0.8).
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    clusters = np.asarray(clusters, dtype=object).astype(str)
    if labels.shape != clusters.shape:
        raise ValueError(f"{len(labels)} labels but {len(clusters)} cluster ids")
    counts = pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(labels, name="label"))  # (clusters, labels)
    majority, agreement = {}, {}
    for cluster, row in counts.iterrows():
        best = row[row == row.max()].index.tolist()
        if len(best) > 1 and unassigned in best:
            best.remove(unassigned)
        majority[cluster] = sorted(best)[0]
        agreement[cluster] = row[majority[cluster]] / row.sum()
    cluster_index = pd.Index(clusters)
    return pd.DataFrame({"cluster": clusters,
                         "majority_label": cluster_index.map(majority).to_numpy(dtype=object),
                         "majority_agreement": cluster_index.map(agreement).to_numpy(dtype=np.float64)})


def clusters_from_column(obs: pd.DataFrame, column: str, rows: np.ndarray, source: str = "the data") -> np.ndarray:
    """The user's clusters of the predicted cells (`rows` of `obs`), as strings; UserError naming --over_clustering
    for a missing column or cells without a cluster."""
    if column not in obs.columns:
        available = _preview(list(obs.columns), k=20) or "none"
        raise UserError(f"--over_clustering {column!r} is not an obs column of {source}; available obs columns: "
                        f"{available}; name the column with your clusters (e.g. leiden), or drop --over_clustering to "
                        "over-cluster with Leiden here")
    values = obs[column].iloc[rows]
    missing = values.isna().to_numpy()
    if missing.any():
        raise UserError(f"{int(missing.sum())} of {len(values)} cells have no cluster in obs[{column!r}]; fill them in, or "
                        "drop --over_clustering to over-cluster with Leiden here")
    return values.astype(str).to_numpy(dtype=object)


def over_clustering_resolution(n_cells: int) -> float:
    """Leiden's resolution for `n_cells`: 5 below 5,000 cells, rising to 30 from 200,000 (CellTypist's steps)."""
    for limit, resolution in RESOLUTION_STEPS:
        if n_cells < limit:
            return resolution
    return RESOLUTION_MAX


def leiden_over_clustering(matrix: sp.spmatrix | np.ndarray, *, seed: int = 0,
                           resolution: float | None = None) -> tuple[np.ndarray, float]:
    """Small clusters of the cells (rows) of a log-normalized matrix (cells, genes), and the resolution used.

    Highly variable genes (when more than 2,000) -> PCA (up to 50 components) -> 15-nearest-neighbour graph ->
    Leiden (scanpy, igraph flavour) at `resolution` (default `over_clustering_resolution`). Deterministic for a
    seed. Needs the igraph package.
    """
    try:
        import igraph  # noqa: F401  (scanpy's Leiden needs it; checked here for a message the user can act on)
    except ImportError:
        raise UserError("majority voting without --over_clustering over-clusters the cells with Leiden, which needs "
                        "the igraph package: pip install igraph, or name your own clusters with --over_clustering "
                        "COLUMN") from None
    import scanpy as sc  # imported here: slow to import, and only over-clustering needs it

    resolution = over_clustering_resolution(matrix.shape[0]) if resolution is None else float(resolution)
    n_cells, n_genes = matrix.shape
    if n_cells < 3 or n_genes < 2:
        return np.zeros(n_cells, dtype=int).astype(str).astype(object), resolution
    adata = anndata.AnnData(X=sp.csr_matrix(matrix, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's notes about its own defaults are not the user's business
        if n_genes > HVG_GENES:
            sc.pp.highly_variable_genes(adata, n_top_genes=HVG_GENES, flavor="seurat", subset=True)
        components = max(1, min(PCA_COMPONENTS, adata.n_obs - 1, adata.n_vars - 1))
        sc.pp.pca(adata, n_comps=components, random_state=seed)
        sc.pp.neighbors(adata, n_neighbors=min(NEIGHBOURS, n_cells - 1), use_rep="X_pca", random_state=seed)
        sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed, key_added="over_clustering")
    return adata.obs["over_clustering"].astype(str).to_numpy(dtype=object), resolution
