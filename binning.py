"""Expression values -> scBERT tokens: scBERT's fixed-width bins, or bins derived from the training data.

Token 0 is a zero (unexpressed gene); tokens 1..bin_num are expression bins; a 0 token is appended to every cell,
so the sequence length is genes + 1 as in scBERT.

Fixed-width bins (scBERT) assume log-normalized values: floor(value / bin_width). On another scale (CPM, TPM,
FPKM, log2 instead of ln) they put nearly every value into one bin. Quantile bins are cut at quantiles of the
training data's non-zero values, so each bin holds an equal share of them whatever the scale: a monotone change of
scale (log <-> linear, another normalisation target) gives the same tokens. The cut points are part of the model
and travel in its checkpoint; prediction bins new data with the training data's cut points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

QUANTILE_SAMPLE = 2_000_000  # non-zero values that estimate the cut points: their quantiles then err by < 0.1 %


@dataclass(frozen=True)
class Binning:
    """How values become tokens: `edges` (bin_num - 1 increasing cut points) for quantile bins, else fixed width."""

    bin_num: int
    bin_width: float = 1.0
    edges: tuple[float, ...] | None = None

    @property
    def kind(self) -> str:
        return "width" if self.edges is None else "quantile"

    def tokens(self, rows: np.ndarray) -> torch.Tensor:
        return bin_expression(rows, self.bin_num, self.bin_width, self.edges)

    def describe(self) -> str:
        if self.edges is None:
            return f"{self.bin_num} bins of width {self.bin_width:g}"
        return (f"{self.bin_num} quantile bins of the training data's non-zero values "
                f"(cut points {self.edges[0]:.3g} ... {self.edges[-1]:.3g})")


def bin_expression(rows: np.ndarray, bin_num: int, bin_width: float = 1.0,
                   edges: tuple[float, ...] | np.ndarray | None = None) -> torch.Tensor:
    """Tokens (B, G+1) int64 of expression rows (B, G).

    Without edges: floor(value / bin_width) clipped to [0, bin_num]; bin_width 1 is scBERT's binning (on
    log-normalized data most non-zero values lie between 0.7 and 2, so a finer width keeps that resolution).
    With edges: 0 for zero, else 1 + the number of cut points at or below the value, so values beyond the training
    data's range take the first or last bin.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"expected a (cells, genes) array, got shape {rows.shape}")
    if edges is None:
        tokens = np.clip(np.floor(rows / bin_width), 0, bin_num).astype(np.int64)  # (B, G)
    else:
        # In float64, as the cut points were computed: a float32 cut point could round onto a data value.
        binned = np.searchsorted(np.asarray(edges, dtype=np.float64), rows.astype(np.float64), side="right") + 1
        tokens = np.where(rows > 0, binned, 0).astype(np.int64)
    tokens = np.concatenate([tokens, np.zeros((rows.shape[0], 1), dtype=np.int64)], axis=1)  # (B, G+1)
    return torch.from_numpy(tokens)


def quantile_binning(matrix: sp.spmatrix, bin_num: int, seed: int = 0) -> Binning:
    """Quantile bins of the non-zero values of `matrix` (cells, genes): bin_num bins of equal share.

    Ties (values that repeat, such as those of one UMI in cells of equal depth) can make cut points coincide; such
    a bin stays empty rather than splitting equal values between two tokens.
    """
    values = sp.csr_matrix(matrix).data
    values = values[values > 0]
    if values.size > QUANTILE_SAMPLE:
        values = np.random.default_rng(seed).choice(values, QUANTILE_SAMPLE, replace=False)
    return binning_of_sample(values, bin_num)


def binning_of_sample(values: np.ndarray, bin_num: int) -> Binning:
    """Quantile bins cut at the quantiles of these non-zero values (already a sample, if one was drawn)."""
    if values.size == 0:
        raise ValueError("no non-zero expression values to derive bins from")
    cuts = np.quantile(values.astype(np.float64), np.arange(1, bin_num) / bin_num)
    return Binning(bin_num=bin_num, edges=tuple(float(c) for c in cuts))
