"""The result of annotating cells: labels and uncertainties per cell, class probabilities, metrics and metadata.

`cell_table` builds the one per-cell table that every output shows under the same column names: the result's
`predicted_labels`, the obs columns `to_adata` writes, and the CLI's predictions.csv and predictions.h5ad. Column
names start with `key_added` (default "pred"), scanpy's convention, so two annotations of one AnnData can coexist:

    {key}_label               predicted cell type; Unassigned where the cell is too uncertain or novel
    {key}_unassigned          True where the label is Unassigned
    {key}_confidence          probability of the called type (the top label)
    {key}_entropy             predictive entropy (nats)
    {key}_expected_entropy    mean entropy of the head samples (aleatoric part)
    {key}_mutual_info         entropy - expected entropy (the samples' disagreement: epistemic part)
    {key}_std                 standard deviation over the head samples of the predicted class's probability
    {key}_novelty             novelty score / threshold (1.0 = the threshold; NaN without novelty statistics)
    {key}_top_label           the called type (call_balance: rarer types favoured), also where the label is Unassigned
    {key}_novelty_p_<view>    each novelty view's p-value under "a known type" (with novelty statistics)
    {key}_cluster             with majority voting: the cell's cluster (the user's column or the over-clustering)
    {key}_majority_label      with majority voting: the label most cells of the cluster got
    {key}_majority_agreement  with majority voting: the share of the cluster's cells whose label is that label

Numbers are float32, as the class probabilities in obsm: 7 significant digits are more than any of them means,
and an atlas's million rows take half the memory.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd

from utils import UNASSIGNED, UserError

DEFAULT_KEY = "pred"
# utils.uncertainty_summary's keys -> their column names after the "{key}_" prefix
UNCERTAINTY_COLUMNS = {"confidence": "confidence", "entropy": "entropy", "expected_entropy": "expected_entropy",
                       "mutual_info": "mutual_info", "pred_std": "std", "novelty": "novelty"}
VOTING_COLUMNS = ("cluster", "majority_label", "majority_agreement")
NOVELTY_P = "novelty_p_"
KEY_CHECK = (lambda key: bool(key.strip()) and "/" not in key, "must be a non-empty name without '/'")
RESULT_COLUMNS = ("label", "unassigned", *UNCERTAINTY_COLUMNS.values(), "top_label", *VOTING_COLUMNS)


def cell_table(cell_ids: Sequence[str], classes: Sequence[str], summary: dict, unassigned: np.ndarray,
               voting: pd.DataFrame | None = None, key_added: str = DEFAULT_KEY) -> pd.DataFrame:
    """One row per cell (indexed by cell id) with the columns listed in this module's docstring.

    `summary` holds utils.uncertainty_summary's arrays (+ "novelty", "novelty_pvalues"); `voting` is
    majority_voting.majority_vote's table. Label columns are categorical with only the categories that occur,
    in the model's class order (Unassigned last).
    """
    classes = list(classes)
    top = np.asarray(classes, dtype=object)[summary["pred"]]
    label = np.where(unassigned, UNASSIGNED, top)
    columns: dict[str, object] = {"label": _categorical(label, [*classes, UNASSIGNED]),
                                  "unassigned": np.asarray(unassigned, dtype=bool)}
    # float32, as the prediction keeps them: no float64 copy of an atlas's columns
    columns |= {name: np.asarray(summary[key], dtype=np.float32) for key, name in UNCERTAINTY_COLUMNS.items()}
    columns["top_label"] = _categorical(top, classes)
    columns |= {f"{NOVELTY_P}{view}": np.asarray(p, dtype=np.float32)
                for view, p in summary.get("novelty_pvalues", {}).items()}
    if voting is not None:
        clusters = voting["cluster"].to_numpy(dtype=object)
        columns["cluster"] = _categorical(clusters, _natural_order(clusters))
        columns["majority_label"] = _categorical(voting["majority_label"].to_numpy(dtype=object), [*classes, UNASSIGNED])
        columns["majority_agreement"] = voting["majority_agreement"].to_numpy(dtype=np.float32)
    table = pd.DataFrame(columns, index=pd.Index([str(c) for c in cell_ids], name=None))
    return table.add_prefix(f"{key_added}_")


def _categorical(values: np.ndarray, order: Sequence[str]) -> pd.Categorical:
    """Categorical of `values` whose categories are only the values that occur, in `order`."""
    present = set(values.tolist())
    return pd.Categorical(values, categories=[name for name in order if name in present])


def _natural_order(values: np.ndarray) -> list[str]:
    """Cluster ids in numeric order when they are numbers ('2' before '10'), else alphabetical."""
    unique = sorted(set(values.tolist()))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


def check_key(key_added: str) -> str:
    """A key for obs/obsm/uns names: non-empty text without '/', which .h5ad files cannot hold in a name."""
    if not isinstance(key_added, str) or not KEY_CHECK[0](key_added):
        raise UserError(f"--key_added {KEY_CHECK[1]}, got {key_added!r}")
    return key_added


@dataclass(eq=False)
class AnnotationResult:
    """What `predict_updated.annotate` returns: per-cell predictions, class probabilities, metrics and metadata.

    `predicted_labels` (cells x columns, see this module's docstring) and `probability_matrix` (cells x classes)
    are indexed by the cells' obs names; `metrics` is None without true labels; `uns` is the run's metadata.
    `to_adata()` writes them where scanpy users look for them.
    """

    predicted_labels: pd.DataFrame
    probability_matrix: pd.DataFrame
    metrics: dict | None
    uns: dict
    key_added: str
    adata: anndata.AnnData | None = None  # the AnnData that was annotated (not a copy)
    rows: np.ndarray | None = None  # positions of the predicted cells in `adata`

    @property
    def classes(self) -> list[str]:
        return list(self.probability_matrix.columns)

    @property
    def labels(self) -> pd.Series:
        """The predicted label per cell (Unassigned where unassigned)."""
        return self.predicted_labels[f"{self.key_added}_label"]

    def __repr__(self) -> str:
        n = len(self.predicted_labels)
        text = (f"AnnotationResult: {n} cells, {len(self.classes)} classes, "
                f"{self.predicted_labels[f'{self.key_added}_unassigned'].mean():.1%} Unassigned")
        voting = self.uns.get("majority_voting")
        if voting:
            text += f", majority voting over {voting['n_clusters']} clusters ({voting['over_clustering']})"
        if self.metrics is not None and "accuracy" in self.metrics:
            text += f", accuracy {self.metrics['accuracy']:.3f}"
        return text + f"; columns {self.key_added}_*"

    def to_adata(self, adata: anndata.AnnData | None = None, key_added: str | None = None, *,
                 inplace: bool = True) -> anndata.AnnData:
        """Write the results into `adata` (default: the AnnData that was annotated) and return it.

        obs gets `predicted_labels`' columns, obsm[f"{key}_probabilities"] the class probabilities (a DataFrame
        with the class names as columns; a plain matrix in the order of uns[key]["classes"] when a class name holds
        a '/', which .h5ad and .zarr files cannot store as a column name), uns[key] the metadata; `key_added`
        replaces the prefix (default: the annotation's). Cells that were not predicted get missing values. `inplace=False` leaves `adata` as it was
        and returns a copy of its predicted cells with the results, as the CLI's predictions.h5ad: of a backed
        AnnData, a copy without the expression matrix (X is None), which may not fit in memory.
        """
        key = self.key_added if key_added is None else check_key(key_added)
        source = self.adata if adata is None else adata
        if source is None:
            raise UserError("this result has no AnnData of its own; pass one: result.to_adata(adata)")
        positions = self._positions_in(source)
        if not inplace:
            source = _cells_of(source, positions)
            positions = np.arange(source.n_obs)
        table = self.predicted_labels.rename(columns=lambda c: key + c[len(self.key_added):])
        stale = [c for c in source.obs.columns if c.startswith(f"{key}_")
                 and (c[len(key) + 1:] in RESULT_COLUMNS or c[len(key) + 1:].startswith(NOVELTY_P))]
        source.obs = source.obs.drop(columns=stale)  # an earlier annotation's columns under this key go
        for column in table.columns:
            source.obs[column] = _spread(table[column], positions, source.n_obs)
        probabilities = np.full((source.n_obs, len(self.classes)), np.nan, dtype=np.float32)
        probabilities[positions] = self.probability_matrix.to_numpy(dtype=np.float32)
        if any("/" in name for name in self.classes):
            # anndata cannot store such column names in .h5ad/.zarr files: a matrix, its columns in uns[key]["classes"]
            source.obsm[f"{key}_probabilities"] = probabilities
        else:
            source.obsm[f"{key}_probabilities"] = pd.DataFrame(probabilities, index=source.obs_names,
                                                               columns=self.classes)
        source.uns[key] = copy.deepcopy(self.uns)
        return source

    def _positions_in(self, adata: anndata.AnnData) -> np.ndarray:
        """Row of each predicted cell in `adata`: by position in the annotated AnnData, else by obs name."""
        if adata is self.adata and self.rows is not None:
            return self.rows
        names = pd.Index(adata.obs_names)
        if not names.is_unique:
            raise UserError("the AnnData's obs names are not unique, so its cells cannot be matched to the predicted "
                            "cells; run adata.obs_names_make_unique() first")
        positions = names.get_indexer(self.predicted_labels.index)
        if (positions < 0).any():
            missing = int((positions < 0).sum())
            raise UserError(f"{missing} of {len(positions)} predicted cells are not in this AnnData (e.g. "
                            f"{self.predicted_labels.index[positions < 0][0]!r}); pass the AnnData that was annotated")
        return positions


def _cells_of(adata: anndata.AnnData, positions: np.ndarray) -> anndata.AnnData:
    """An in-memory copy of the cells at `positions`; of a backed AnnData all but the expression matrix (X is None:
    obs, var, obsm and uns, which backed mode holds in memory), so the matrix on disk is never loaded."""
    if not adata.isbacked:
        return adata[positions].copy()
    skeleton = anndata.AnnData(obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), uns=copy.deepcopy(dict(adata.uns)))
    return skeleton[positions].copy()


def _spread(column: pd.Series, positions: np.ndarray, n_obs: int):
    """A column's values at `positions` of n_obs rows, missing elsewhere (NaN, a missing category or pd.NA)."""
    if len(positions) == n_obs and np.array_equal(positions, np.arange(n_obs)):
        return column.to_numpy() if not isinstance(column.dtype, pd.CategoricalDtype) else column.array
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = np.full(n_obs, -1, dtype=column.cat.codes.dtype)
        codes[positions] = column.cat.codes.to_numpy()
        return pd.Categorical.from_codes(codes, dtype=column.dtype)
    if column.dtype == bool:
        values = pd.array(np.zeros(n_obs, dtype=bool), dtype="boolean")
        values[:] = pd.NA
        values[positions] = column.to_numpy()
        return values
    values = np.full(n_obs, np.nan, dtype=column.dtype)  # float columns keep their precision
    values[positions] = column.to_numpy()
    return values
