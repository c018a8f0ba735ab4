"""Novelty statistics: how unlike a model's training cells a cell is, in views that complement each other.

A checkpoint's `novelty` entry holds them: the head's features (class means and a shared covariance in their top
principal components), the binned expression's (a neighbour index, class means and covariances), the training
cells' fingerprints, and each view's scores on validation cells, which calibrate the combined score and its
threshold. Data flow: features (cells, width) and tokens (cells, genes+1) -> each view's raw score (cells,) ->
-log p-values against the validation cells -> their sum, the novelty score (cells,).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.utils.extmath import randomized_svd
from torch import Tensor

from utils import autocast, entropy

if TYPE_CHECKING:  # the model imports this module; the type is only for annotations
    from bayesian_sparse_transformer import BayesianSparseTransformer

NOVELTY_LAYERS = ("fc2", "gene_features")
# fc1's input: the head's later layers learn to map every cell onto a known type, an unseen one included (on
# leave-one-type-out runs of PBMC splits the fc2 distance flagged unseen monocytes below chance)
NOVELTY_LAYER = "gene_features"
NOVELTY_PCS = 50
# The expression views' axes: on leave-one-type-out runs of PBMC splits the benchmark does not use (~230 training
# cells a fold model), 100 PCs of the binned expression scored unseen types +0.008 ± 0.009 AUROC above 50 (higher on
# 16 of 21 cases, on every split); 200 no better (+0.006 ± 0.018). More cells resolve more axes, not fewer.
NOVELTY_INPUT_PCS = 100
NOVELTY_KNN_K = 15
NOVELTY_NEIGHBOURS = 5000  # training cells a checkpoint keeps as its input view's neighbour index (a random subset beyond)
# The views a novelty score combines (see calibrate_novelty): every one there is. Measured on leave-one-type-out
# runs of splits that the benchmark does not use (benchmarks/novel_type.py); no subset was better beyond noise.
NOVELTY_PARTS = ("mahalanobis", "input_knn", "input_mahalanobis", "input_likelihood", "entropy")
INPUT_VIEWS = frozenset({"input_knn", "input_mahalanobis", "input_likelihood"})  # measured in the expression's PCs
MIN_CLASS_COVARIANCE_CELLS = 3  # fewer training cells of a type: the input_likelihood view uses the shared covariance

# What a checkpoint's statistics hold (fit_novelty, fit_training_cells, calibrate_novelty), and with an input view
# in their parts what fit_input_neighbours adds. Statistics without one of them were written by an earlier version.
STATISTICS_KEYS = frozenset({"layer", "classes", "center", "scale", "components", "means", "precision_cholesky",
                             "trained_fingerprints", "parts", "calibration", "threshold", "fpr"})
INPUT_STATISTICS_KEYS = frozenset({"input_center", "input_scale", "input_components", "neighbours", "knn_k",
                                   "input_means", "input_precision_cholesky", "input_class_precision_cholesky",
                                   "input_class_log_det"})


def missing_statistics(stats: dict) -> list[str]:
    """The entries (sorted) that novelty statistics of the current format hold and `stats` lacks: none for
    statistics this version wrote, some for an earlier version's."""
    parts = stats.get("parts", ())
    needed = STATISTICS_KEYS | (INPUT_STATISTICS_KEYS if INPUT_VIEWS & set(parts) else frozenset())
    calibration = stats.get("calibration", {})
    return sorted(needed - set(stats)) + [f"calibration[{part}]" for part in parts if part not in calibration]


@torch.no_grad()
def collect_features(model: BayesianSparseTransformer, loader: Iterable, layer: str = NOVELTY_LAYER, *,
                     device: torch.device | str = "cpu", amp: bool = False) -> np.ndarray:
    """The head's novelty features (cells, width) of every batch of `loader` (batches of (tokens, labels))."""
    device = torch.device(device)
    model.eval()
    outputs = []
    for tokens, _ in loader:
        with autocast(device, amp):
            features = model.head.gene_features(model.encode(tokens.to(device)))
            outputs.append(model.head.novelty_features(features, layer).float().cpu())
    return torch.cat(outputs).numpy()


def fit_novelty(features: np.ndarray, labels: np.ndarray, *, more: Iterable[tuple[np.ndarray, np.ndarray]] = (),
                layer: str = NOVELTY_LAYER, pcs: int = NOVELTY_PCS) -> dict:
    """Class means and one shared (tied) covariance of the training cells' features, shrunk by Ledoit-Wolf.

    features (cells, width), labels (cells,) class indices. The features are standardized and projected on the
    top `pcs` principal components of these cells: gene features are as wide as the gene list, and a few dozen
    axes carry the cell-to-cell variation (on held-out PBMC types, adding the distance off those axes as
    probabilistic PCA would, or keeping one axis per 10 cells, lowered the AUROC). more: further training cells as
    (features, labels) blocks that only the class statistics see, each projected as it comes, so a large training
    set is never held at full width (the gene features of Zheng68K's 55,000 training cells are 3.7 GB). The
    covariance is stored as the Cholesky factor U of its inverse (precision = U U^T), so a distance is one matrix
    product; the shrinkage keeps it invertible on few cells.
    """
    center, scale, components, projected = _principal_axes(features, pcs)
    projected, labels = _project_blocks(projected, labels, more, center, scale, components)
    present, means, covariance = _class_statistics(projected, labels)
    return {"layer": layer, "classes": [int(c) for c in present], "center": _float_tensor(center),
            "scale": _float_tensor(scale), "components": _float_tensor(components), "means": _float_tensor(means),
            "precision_cholesky": _float_tensor(_whitening(covariance))}


def _project_blocks(projected: np.ndarray, labels: np.ndarray, more: Iterable[tuple[np.ndarray, np.ndarray]],
                    center: np.ndarray, scale: np.ndarray, components: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected cells (cells, pcs) and their labels, followed by the `more` blocks of (rows, labels) projected as
    they come: only one block is ever held at full width."""
    blocks, block_labels = [projected], [np.asarray(labels)]
    for block, block_label in more:
        blocks.append(_project(block, center, scale, components))
        block_labels.append(np.asarray(block_label))
    return np.concatenate(blocks), np.concatenate(block_labels)


def _class_statistics(projected: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classes present, their means (classes, pcs) and the Ledoit-Wolf-shrunk covariance (pcs, pcs) they share,
    from projected cells (cells, pcs)."""
    present = np.unique(labels)  # a class without training cells has no mean; the minimum skips it
    means = np.stack([projected[labels == c].mean(axis=0) for c in present])  # (classes present, pcs)
    centered = projected - means[np.searchsorted(present, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centered).covariance_
    covariance += 1e-6 * max(np.trace(covariance) / len(covariance), 1e-12) * np.eye(len(covariance))  # round-off
    return present, means, covariance


def _whitening(covariance: np.ndarray) -> np.ndarray:
    """The Cholesky factor U (pcs, pcs) of a covariance's inverse (precision = U U^T), as checkpoints store it."""
    lower = np.linalg.cholesky(covariance)  # covariance = L L^T, so precision = L^-T L^-1 = U U^T with U = L^-T
    return np.linalg.inv(lower).T


def fit_input_neighbours(binned: np.ndarray, pcs: int = NOVELTY_INPUT_PCS, k: int = NOVELTY_KNN_K, *,
                         labels: np.ndarray | None = None, more: Iterable[tuple[np.ndarray, np.ndarray]] = ()) -> dict:
    """A neighbour index of training cells in the top `pcs` principal components of their binned expression, and
    with `labels` each training type's mean and covariance in the same axes.

    binned (cells, genes): the cells' expression bins (tokens without the appended one); pass a subset of at most
    a few thousand training cells, they are stored. The model-free views: a cell of a new type can be far from
    every training cell in expression while the head's features, trained to tell the known types apart, map it
    close to one of them. labels (cells,): their class indices, for the class statistics of the input_mahalanobis
    and input_likelihood views, which also see the further training cells in `more`, blocks of (binned, labels)
    projected as they come.
    """
    center, scale, components, projected = _principal_axes(binned, pcs)
    stats = {"input_center": _float_tensor(center), "input_scale": _float_tensor(scale),
             "input_components": _float_tensor(components), "neighbours": _float_tensor(projected),
             "knn_k": int(min(k, len(projected)))}
    if labels is None:
        return stats
    projected, labels = _project_blocks(projected, labels, more, center, scale, components)
    _, means, covariance = _class_statistics(projected, labels)
    own_whiten, log_det = _class_covariances(projected, labels, covariance)
    return stats | {"input_means": _float_tensor(means), "input_precision_cholesky": _float_tensor(_whitening(covariance)),
                    "input_class_precision_cholesky": _float_tensor(own_whiten),
                    "input_class_log_det": _float_tensor(log_det)}


def _class_covariances(projected: np.ndarray, labels: np.ndarray, shared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each class's own Ledoit-Wolf-shrunk covariance, as the Cholesky factor of its inverse (classes, pcs, pcs),
    and its log-determinant (classes,), classes in `np.unique(labels)` order.

    A class with fewer than MIN_CLASS_COVARIANCE_CELLS cells has no covariance of its own and takes the `shared`
    one. A ridge of 1e-3 of the shared covariance's mean variance keeps a few-cell class's covariance, shrunk
    towards a small multiple of the identity, from claiming an absurdly high density.
    """
    ridge = 1e-3 * np.trace(shared) / len(shared) * np.eye(len(shared))
    whitens, log_dets = [], []
    for c in np.unique(labels):
        rows = projected[labels == c]
        covariance = (LedoitWolf().fit(rows).covariance_ if len(rows) >= MIN_CLASS_COVARIANCE_CELLS else shared) + ridge
        whitens.append(_whitening(covariance))
        log_dets.append(np.linalg.slogdet(covariance)[1])
    return np.stack(whitens), np.asarray(log_dets)


def _principal_axes(rows: np.ndarray, pcs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-column centre and scale, the top principal axes (pcs, width) of the standardized rows, the projection."""
    rows = np.array(rows, dtype=np.float64)  # a copy, standardized in place: one float64 copy of the rows at a time
    # std of 1,024 columns at a time: on all of them at once numpy builds a second full-size temporary
    center = rows.mean(axis=0)
    scale = np.concatenate([rows[:, start : start + 1024].std(axis=0) for start in range(0, rows.shape[1], 1024)])
    scale[scale < 1e-6] = 1.0  # genes or ReLU units that are constant over the training cells
    rows -= center
    rows /= scale
    pcs = min(pcs, *rows.shape)
    _, _, components = randomized_svd(rows, pcs, random_state=0)  # (pcs, width)
    return center, scale, components, rows @ components.T


def _project(rows: np.ndarray, center: np.ndarray, scale: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Rows (cells, width) standardized and projected (cells, pcs) on principal axes from `_principal_axes`."""
    return ((np.asarray(rows, dtype=np.float64) - center) / scale) @ np.asarray(components).T


def _float_tensor(array: np.ndarray) -> Tensor:
    """float32 tensors: plain data that torch.load(weights_only=True) reads back."""
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def _stat(stats: dict, key: str) -> np.ndarray:
    return np.asarray(stats[key], dtype=np.float64)  # no copy for `numpy_statistics`


def numpy_statistics(stats: dict) -> dict:
    """Novelty statistics with their tensors as numpy arrays (floating point as float64), converted once rather
    than on every batch: the principal axes are as wide as the gene list."""
    def convert(value):
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, Tensor):
            return value.numpy().astype(np.float64) if value.is_floating_point() else value.numpy()
        return value
    return convert(stats)


def novelty_distance(features: np.ndarray, stats: dict) -> np.ndarray:
    """Mahalanobis distance (cells,) of each cell's features to the nearest training class mean (see fit_novelty)."""
    projected = _project(features, _stat(stats, "center"), _stat(stats, "scale"), _stat(stats, "components"))
    return _nearest_class_distance(projected, _stat(stats, "means"), _stat(stats, "precision_cholesky"))


def _nearest_class_distance(projected: np.ndarray, means: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """Mahalanobis distance (cells,) of projected cells (cells, pcs) to the nearest class mean (see _class_statistics)."""
    return np.sqrt(_min_squared_distances(projected @ whiten, means @ whiten, 1).ravel())


def input_projection(binned: np.ndarray, stats: dict) -> np.ndarray:
    """Cells' binned expression (cells, genes) in the neighbour index's principal components (cells, pcs), where
    every input view measures (see fit_input_neighbours)."""
    return _project(binned, _stat(stats, "input_center"), _stat(stats, "input_scale"), _stat(stats, "input_components"))


def input_neighbours(projected: np.ndarray, stats: dict) -> np.ndarray:
    """Squared distances (cells, knn_k) from `input_projection`s of cells to their `knn_k` nearest stored training
    cells."""
    return _min_squared_distances(projected, _stat(stats, "neighbours"), int(stats["knn_k"]))


def input_knn_distance(nearest: np.ndarray) -> np.ndarray:
    """The input_knn view's score (cells,): the mean distance to the nearest training cells (`input_neighbours`)."""
    return np.sqrt(nearest).mean(axis=1)


def input_mahalanobis_distance(projected: np.ndarray, stats: dict) -> np.ndarray:
    """The input_mahalanobis view's score (cells,): the Mahalanobis distance of `input_projection`s to the nearest
    training type's mean under the types' shared covariance."""
    return _nearest_class_distance(projected, _stat(stats, "input_means"), _stat(stats, "input_precision_cholesky"))


def input_likelihood_distance(projected: np.ndarray, stats: dict) -> np.ndarray:
    """The input_likelihood view's score (cells,): -2 log density (up to a constant) of `input_projection`s under
    the most likely training type's own Gaussian (each type's covariance: a type that varies little is a tight
    ellipsoid, one that varies much a broad one, where the shared covariance treats them alike)."""
    means, whitens = _stat(stats, "input_means"), _stat(stats, "input_class_precision_cholesky")
    log_dets = _stat(stats, "input_class_log_det")
    return np.min([(((projected - mean) @ whiten) ** 2).sum(axis=1) + log_det
                   for mean, whiten, log_det in zip(means, whitens, log_dets)], axis=0)


class MemberNovelty(NamedTuple):
    """One member's novelty of each cell: its score (cells,), whether the cell is one of its training cells
    (cells,) (see `training_cells`) and each view's -log p-value (cells,) (see `novelty_evidence`)."""

    score: np.ndarray
    trained: np.ndarray
    evidence: dict[str, np.ndarray]


def training_cells(binned: np.ndarray, stats: dict) -> np.ndarray:
    """Whether each cell (cells,) is one of the model's training cells: its expression bins (cells, genes) have a
    stored fingerprint (see `fit_training_cells`).

    A model's own training cells sit farther out on principal axes fitted to them than new cells do, so its
    novelty score, calibrated on cells it never saw, flags many of them (37 % for a demo fold model, against 5 %
    of its validation cells); `ensemble_novelty` leaves such a member out for those cells.
    """
    return np.isin(cell_fingerprints(binned), np.asarray(stats["trained_fingerprints"]))


def fit_training_cells(chunks: Iterable[np.ndarray]) -> dict:
    """The sorted fingerprints of a model's training cells, 8 bytes a cell, so that every one is recognised however
    many there are. chunks: their expression bins (cells, genes) as `expression_bins` gives them, a block of cells
    at a time (all of them at once can be larger than memory)."""
    return {"trained_fingerprints": torch.from_numpy(np.unique(np.concatenate([cell_fingerprints(c) for c in chunks])))}


def cell_fingerprints(binned: np.ndarray) -> np.ndarray:
    """A 64-bit hash (cells,) of each cell's expression bins (cells, genes): the same bins give the same hash, and two
    different cells share one with probability ~2^-64."""
    rows = np.ascontiguousarray(np.asarray(binned).astype(np.int16))  # bin indices, exact in any numeric dtype
    return np.fromiter((int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
                        for row in rows), dtype=np.int64, count=len(rows))


def expression_bins(tokens: Tensor | np.ndarray) -> np.ndarray:
    """Model input tokens (cells, genes+1) as the expression bins (cells, genes) the input view works on."""
    return np.asarray(torch.as_tensor(tokens)[:, :-1].cpu(), dtype=np.float64)


def _min_squared_distances(cells: np.ndarray, references: np.ndarray, k: int) -> np.ndarray:
    """The k smallest squared Euclidean distances (cells, k) from each cell to the reference rows."""
    squared = (cells**2).sum(1, keepdims=True) - 2 * cells @ references.T + (references**2).sum(1)  # (cells, refs)
    return np.maximum(np.partition(squared, k - 1, axis=1)[:, :k], 0.0)


def novelty_parts(features: np.ndarray, tokens: Tensor | np.ndarray, probs: np.ndarray, stats: dict,
                  projected: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each view's raw score (cells,) that `stats` was fitted for: features as `collect_features` gives them,
    tokens (cells, genes+1) the model's input, probs (cells, classes) the model's predictive probabilities;
    projected the cells' `input_projection` when the caller has it already.
    """
    names = stats["parts"]
    parts = {}
    if "mahalanobis" in names:
        parts["mahalanobis"] = novelty_distance(features, stats)
    if projected is None and INPUT_VIEWS & set(names):
        projected = input_projection(expression_bins(tokens), stats)
    if "input_knn" in names:
        parts["input_knn"] = input_knn_distance(input_neighbours(projected, stats))
    if "input_mahalanobis" in names:
        parts["input_mahalanobis"] = input_mahalanobis_distance(projected, stats)
    if "input_likelihood" in names:
        parts["input_likelihood"] = input_likelihood_distance(projected, stats)
    if "entropy" in names:
        parts["entropy"] = entropy(np.asarray(probs, dtype=np.float64))
    return parts


def calibrate_novelty(stats: dict, parts: dict[str, np.ndarray], fpr: float) -> dict:
    """`stats` completed with the validation cells' scores of each view and the threshold at false-flag rate fpr.

    parts: `novelty_parts` of validation cells (known types the model did not train on). Each view becomes the
    share of those cells scoring at least as high (a p-value under "a known type"), and the novelty score is the
    sum of the views' -log p-values (Fisher's combination): one view far in its tail, or several moderately,
    make a cell novel, and views on different scales weigh alike.
    """
    # float64: a validation cell scored again must find its own score in the reference, not a rounded neighbour
    calibration = {name: torch.from_numpy(np.sort(np.asarray(values, dtype=np.float64))) for name, values in parts.items()}
    stats = stats | {"parts": list(parts), "calibration": calibration}
    return stats | {"threshold": novelty_threshold(novelty_score(parts, stats), fpr), "fpr": float(fpr)}


def novelty_score(parts: dict[str, np.ndarray], stats: dict, evidence: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The combined novelty (cells,) of `novelty_parts` (see calibrate_novelty). evidence: the parts'
    `novelty_evidence`, when the caller has it."""
    return sum((novelty_evidence(parts, stats) if evidence is None else evidence).values())


def novelty_evidence(parts: dict[str, np.ndarray], stats: dict) -> dict[str, np.ndarray]:
    """Each view's -log p-value (cells,): p is the share of the validation cells (known types) scoring at least as
    high in that view, so which view makes a cell novel stays visible (`novelty_score` sums them)."""
    evidence = {}
    for name in stats["parts"]:
        reference = _stat(stats["calibration"], name)  # (validation cells,) sorted
        at_least = len(reference) - np.searchsorted(reference, parts[name], side="left")  # (cells,)
        evidence[name] = -np.log((at_least + 1) / (len(reference) + 1))  # +1: a p-value is never 0
    return evidence


def novelty_threshold(scores: np.ndarray, fpr: float) -> float:
    """The (1 - fpr) quantile of known-type cells' scores: about `fpr` of such cells lie above it."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - fpr))


def ensemble_novelty(scores: list[np.ndarray], thresholds: list[float], trained: np.ndarray | None = None) -> np.ndarray:
    """The members' scores divided by their own thresholds, averaged: 1.0 is the threshold for every size.

    Each fold model has its own feature space and scale, so raw scores are not comparable across members;
    relative to its threshold (its validation cells' (1 - fpr) quantile) each says "how unusual" on one scale.
    trained (members, cells), the members' `MemberNovelty.trained`: a cell is scored only by the members that did
    not train on it (in a cross-fitted ensemble, the one it validated), unless every member trained on it.
    """
    relative = np.stack([d / max(t, 1e-12) for d, t in zip(scores, thresholds)])  # (members, cells)
    if trained is None:
        return relative.mean(axis=0)
    use = ~np.asarray(trained, dtype=bool)
    use[:, ~use.any(axis=0)] = True
    return (relative * use).sum(axis=0) / use.sum(axis=0)
