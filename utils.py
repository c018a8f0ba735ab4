"""Data layer, metrics and small shared helpers for the Bayesian sparse transformer.

Data flows one way: AnnData -> validated log-normalized csr matrix (cells, genes) -> gene-aligned matrix
-> scBERT bin tokens (cells, genes+1), densified one batch at a time by `BinnedDataset`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import importlib.metadata
import io
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, NamedTuple

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from binning import Binning

try:
    from anndata.io import write_elem
except ImportError:  # anndata < 0.11
    from anndata.experimental import write_elem


class UserError(Exception):
    """A problem the user can fix (bad input, wrong setting); CLIs print it as one line and exit with status 2.

    Messages name settings in the command line's spelling (--overwrite, --cv_splits 3); raised inside Python (`fit`,
    `annotate`, `pipeline`) the same error reads in Python's (overwrite=True, cv_splits=3). `options` names the
    settings that fix it by their Python names, with the value to try where there is one ({"layer": None,
    "device": "cpu"}), shown in the caller's spelling.
    """

    def __init__(self, message: str, options: dict[str, Any] | None = None):
        super().__init__(message)
        self.options = options or {}

    @property
    def cli_message(self) -> str:
        """The message as the command line says it: flags and a '(command line: ...)' hint."""
        return f"{_one_line(self.args[0], limit=2000)}{option_hint(self.options)}"

    def __str__(self) -> str:
        hint = ", ".join(f"{name}={value!r}" for name, value in self.options.items())
        return python_spelling(str(self.args[0])) + (f" (Python: {hint})" if hint else "")


class OutputError(UserError):
    """An output file could not be written (disk full, no permission); the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"cannot write {path}: {_os_cause(cause)}; check free space and write permission there, "
                         "or choose another output directory")


DEFAULT_LABEL_KEY = "cell_type"
BUNDLED_LABEL_KEY = "bulk_labels"  # cell types of the bundled scanpy pbmc68k_reduced example
LOG_SCALE_MAX = 30.0  # log1p of a normalized value cannot reach 30 (that is e^30 counts), so larger means not logged
NORMALIZE_TARGET = 1e4  # counts per cell after normalize_total, as in scanpy tutorials and scBERT
UNLABELLED = -1  # label a BinnedDataset returns for cells without labels
PROB_EPS = 1e-12  # floor for probabilities inside logarithms
UNASSIGNED = "Unassigned"  # prediction's label for cells too uncertain to name, so no cell type may be called that
BACKED_CHUNK_CELLS = 10_000  # cells read at a time from a backed (on-disk) AnnData
ALL_CELLS = slice(None)  # the rows of every cell, for the readers that take a selection


def _one_line(text: object, limit: int = 300) -> str:
    """Collapse a (library) message to one short line so UserError messages stay one line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _os_cause(error: OSError) -> str:
    """The reason of an OSError in a few words, e.g. 'No space left on device'.

    HDF5 errors carry no strerror but spell the C library's reason out inside a long message.
    """
    if error.strerror:
        return error.strerror
    found = re.search(r"error message = '([^']+)'", str(error))
    return found.group(1) if found else _one_line(error, limit=200)


def _preview(names: Sequence[object], k: int = 5) -> str:
    """Quote up to k names, e.g. "'A', 'B' (+3 more)", for error messages."""
    shown = ", ".join(repr(str(n)) for n in list(names)[:k])
    return shown + (f" (+{len(names) - k} more)" if len(names) > k else "")


# ----------------------------------------------------------------------------------------------------------
# Data: read and validate


@dataclass
class ExpressionData:
    """A validated log-normalized expression matrix with its genes, cell ids and optional labels.

    Rows of `matrix` are the cells in `cell_ids`; after `min_cells_per_class` filtering that is a subset of
    `adata.obs_names`. `adata` is the AnnData as read and is never modified here.
    """

    matrix: sp.csr_matrix  # (cells, genes) float32
    genes: list[str]
    cell_ids: list[str]
    labels: np.ndarray | None  # (cells,) str
    adata: anndata.AnnData
    label_key: str | None = None  # the obs column the labels came from (the bundled data's own, whatever was asked)


def load_dataset(
    data_path: str | os.PathLike | None,
    *,
    label_key: str | None = DEFAULT_LABEL_KEY,
    layer: str | None = None,
    use_raw: bool | None = None,
    normalize: bool = False,
    require_labels: bool = True,
    min_cells_per_class: int = 0,
    gene_symbols: str | None = None,
    any_scale: bool = False,
) -> ExpressionData:
    """Read an .h5ad file (or the bundled pbmc68k_reduced example when `data_path` is None) and validate it.

    See `dataset_from_anndata` for the checks and `read_input` for the bundled example's defaults.
    """
    source = read_input(data_path, label_key=label_key, layer=layer, use_raw=use_raw)
    return dataset_from_anndata(
        source.adata,
        label_key=source.label_key,
        layer=layer,
        use_raw=source.use_raw,
        normalize=normalize,
        require_labels=require_labels,
        min_cells_per_class=min_cells_per_class,
        gene_symbols=gene_symbols,
        source=source.name,
        any_scale=any_scale,
    )


class Input(NamedTuple):
    """An AnnData to read, what messages call it, and the label column and .raw choice to read it with."""

    adata: anndata.AnnData
    name: str
    label_key: str | None
    use_raw: bool | None


def read_input(data_path: str | os.PathLike | None, *, label_key: str | None = DEFAULT_LABEL_KEY,
               layer: str | None = None, use_raw: bool | None = None, backed: bool = False) -> Input:
    """The AnnData of an .h5ad file (`backed`: opened with .X and .raw left on disk; close `adata.file` after use),
    or of the bundled pbmc68k_reduced example when `data_path` is None: that one in memory, with its 'bulk_labels'
    column when `label_key` is None or the default, and its log-normalized `.raw` matrix (its `.X` is scaled)."""
    if data_path is not None:
        return Input(_read_h5ad(Path(data_path), backed=backed), str(data_path), label_key, use_raw)
    if label_key in (None, DEFAULT_LABEL_KEY):
        label_key = BUNDLED_LABEL_KEY
    if use_raw is None and layer is None:
        use_raw = True  # its .X is scaled: read its log-normalized .raw, without a warning for our own example
    return Input(_bundled_example(), "the bundled pbmc68k_reduced example", label_key, use_raw)


def dataset_from_anndata(
    adata: anndata.AnnData,
    *,
    label_key: str | None = DEFAULT_LABEL_KEY,
    layer: str | None = None,
    use_raw: bool | None = None,
    normalize: bool = False,
    require_labels: bool = True,
    min_cells_per_class: int = 0,
    gene_symbols: str | None = None,
    source: str = "the AnnData",
    any_scale: bool = False,
) -> ExpressionData:
    """Validate an in-memory AnnData and return its log-normalized matrix as csr float32 (the user's is untouched).

    Picks `.X`, `adata.layers[layer]` or `adata.raw` (`use_raw`; None: .raw only where .X is unusable and .raw
    is not, with a warning, see `_select_matrix`); raises UserError for zero cells/genes,
    duplicated gene names, non-numeric, NaN/inf, negative (scaled) or not-log-transformed values (raw counts),
    and for a missing or incomplete label column. `normalize=True` applies normalize_total(1e4) + log1p to a copy
    when values are not log-transformed. Without `require_labels`, absent or incomplete labels give `labels=None`.
    Classes with fewer than `min_cells_per_class` cells are dropped with a warning. Genes are named by var_names,
    or by the var column `gene_symbols` (e.g. symbols when var_names are Ensembl IDs). `source` names the data in
    messages. `any_scale`: values need not be log-normalized (quantile bins take any scale, see binning.py), only
    finite and non-negative; raw integer counts are still refused without `normalize`.
    """
    reader = cell_reader(adata, label_key=label_key, layer=layer, use_raw=use_raw, normalize=normalize,
                         require_labels=require_labels, gene_symbols=gene_symbols, source=source, any_scale=any_scale)
    data = reader.read(ALL_CELLS)
    if data.labels is not None and min_cells_per_class > 0:
        data = _drop_small_classes(data, min_cells_per_class)
    return data


def cell_reader(
    adata: anndata.AnnData,
    *,
    label_key: str | None = DEFAULT_LABEL_KEY,
    layer: str | None = None,
    use_raw: bool | None = None,
    normalize: bool = False,
    require_labels: bool = True,
    gene_symbols: str | None = None,
    source: str = "the AnnData",
    any_scale: bool = False,
    first_rows: slice | np.ndarray = ALL_CELLS,
) -> CellReader:
    """A `CellReader` of `adata`'s cells, with the options and checks of `dataset_from_anndata`.

    The matrix (automatic .raw) is chosen by the cells `first_rows`: all cells, or the first chunk of a stream.
    """
    matrix, genes, first_block = _select_matrix(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols,
                                                source=source, normalize=normalize or any_scale, rows=first_rows)
    if getattr(matrix, "format", None) == "csc" and not _all_cells(first_rows):
        matrix = _as_csr(matrix.to_memory())  # a column-compressed file has no cheap row blocks: read it once
    labels = _read_labels(adata, label_key, require_labels=require_labels, source=source)
    reader = CellReader(adata, matrix, genes, labels, label_key if labels is not None else None, source, normalize,
                        any_scale)
    if first_block is not None:
        reader.first = (first_rows, first_block)
    return reader


@dataclass(eq=False)
class CellReader:
    """The cells of an AnnData read a block of rows at a time, each block checked as `dataset_from_anndata` checks
    a whole matrix (same one-line errors, naming the block's cells), so prediction can stream a file larger than
    memory. Whether values are normalized is decided by the first block read and holds for every block.
    """

    adata: anndata.AnnData
    matrix: Any  # (cells, genes) .X, a layer or .raw.X as stored: in memory, or on disk for a backed AnnData
    genes: list[str]
    labels: np.ndarray | None  # (cells,) str, of every cell
    label_key: str | None
    source: str
    normalize: bool  # after the first block: whether blocks are normalized
    any_scale: bool
    first: tuple[slice | np.ndarray, sp.csr_matrix] | None = None  # rows read to choose the matrix, and their block
    decided: bool = False

    @property
    def n_cells(self) -> int:
        return self.matrix.shape[0]

    def read(self, rows: slice | np.ndarray) -> ExpressionData:
        """The cells `rows` (all cells, or sorted positions) as a validated, log-normalized csr float32 matrix."""
        if self.first is not None and _same_rows(self.first[0], rows):
            block = self.first[1]  # read already, to choose the matrix
        else:
            block = _read_rows(self.matrix, rows)
        self.first = None
        positions = np.arange(self.n_cells)[rows]
        source = self.source
        if len(positions) < self.n_cells:
            source = f"{self.source} (cells {positions[0] + 1:,} to {positions[-1] + 1:,})"
        if self.decided and self.normalize:
            _check_values(block, source)
            matrix = _normalize_log1p(block)
        else:
            matrix = _as_log_normalized(block, normalize=self.normalize, source=source, any_scale=self.any_scale)
            # the first block decides for all (normalized when it is beyond log scale), so every cell is treated alike
            self.normalize = self.normalize and block.data.size > 0 and float(block.data.max()) > LOG_SCALE_MAX
            self.decided = True
        obs_names = self.adata.obs_names
        cell_ids = [str(c) for c in (obs_names if _all_cells(rows) else obs_names[rows])]
        labels = self.labels[rows] if self.labels is not None else None
        return ExpressionData(matrix, self.genes, cell_ids, labels, self.adata, self.label_key)


def _bundled_example() -> anndata.AnnData:
    """scanpy's pbmc68k_reduced (700 cells x 765 genes, 10 cell types); ships with scanpy, no download."""
    import scanpy  # imported here because it is slow to import and only this example needs it

    return scanpy.datasets.pbmc68k_reduced()


def _read_h5ad(path: Path, backed: bool = False) -> anndata.AnnData:
    """Read an .h5ad file into memory (`backed`: all but .X and .raw.X, read when used), turning I/O and format
    errors into UserError."""
    if not path.exists():
        raise UserError(f"data file not found: {path}; check the path")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an .h5ad file; pass the path of an .h5ad file")
    try:
        return anndata.read_h5ad(path, backed="r" if backed else None)
    # h5py raises OSError for non-HDF5 or truncated files; anndata raises KeyError/TypeError/ValueError for
    # HDF5 files that do not hold an AnnData.
    except (OSError, KeyError, TypeError, ValueError) as e:
        hint = "" if path.suffix == ".h5ad" else " (expected an .h5ad file)"
        raise UserError(
            f"cannot read {path} as AnnData{hint}: {_one_line(e)}; save your data with adata.write_h5ad()"
        ) from e


def _select_matrix(adata: anndata.AnnData, *, layer: str | None, use_raw: bool | None, gene_symbols: str | None,
                   source: str, normalize: bool = False, rows: slice | np.ndarray = ALL_CELLS):
    """Pick .X, a layer or .raw; check shape and gene names; return (the matrix as stored, genes, its cells `rows`
    as csr float32 when they were read to choose, else None).

    `use_raw=None` (automatic, without a layer) reads .X unless .X cannot be used as it is (negative values of
    scaled data, NaN, or values beyond log scale without `normalize`) while .raw can: then .raw, with a warning
    naming use_raw. scanpy's own pbmc68k_reduced is such data: scaled .X, log-normalized .raw. The cells `rows`
    judge: all of them, or the first chunk of a stream.
    """
    if use_raw is not None or layer is not None or adata.raw is None:
        return *_matrix_of(adata, layer=layer, use_raw=bool(use_raw), gene_symbols=gene_symbols, source=source), None
    if adata.X is not None:
        x, genes = _matrix_of(adata, layer=None, use_raw=False, gene_symbols=gene_symbols, source=source)
        block = _read_rows(x, rows)
        problem = _log_scale_problem(block, normalize=normalize)
        if problem is None:
            return x, genes, block
    else:
        x, problem = None, "is empty"
    try:
        raw, raw_genes = _matrix_of(adata, layer=None, use_raw=True, gene_symbols=gene_symbols, source=source)
        raw_block = _read_rows(raw, rows)
    except UserError:
        raw = None
    if raw is None or _log_scale_problem(raw_block, normalize=normalize) is not None:
        # .raw cannot help either: .X's own error, naming use_raw and layer, follows
        if x is None:
            return *_matrix_of(adata, layer=None, use_raw=False, gene_symbols=gene_symbols, source=source), None
        return x, genes, block
    warnings.warn(f".X of {source} {problem}; reading adata.raw instead, as use_raw=True (--use_raw) does",
                  stacklevel=4)
    return raw, raw_genes, raw_block


def _log_scale_problem(matrix: sp.csr_matrix, *, normalize: bool) -> str | None:
    """Why `_as_log_normalized` would refuse the matrix ('has negative values (scaled data)', ...), or None."""
    values = matrix.data
    if not np.isfinite(values).all():
        return "has NaN or infinite values"
    if values.size and values.min() < 0:
        return f"has negative values (min {values.min():.3g}: scaled data)"
    if not normalize and values.size and values.max() > LOG_SCALE_MAX:
        return f"is not log-normalized (values up to {values.max():.3g})"
    return None


def _matrix_of(adata: anndata.AnnData, *, layer: str | None, use_raw: bool, gene_symbols: str | None, source: str):
    """.X, a layer or .raw as asked, unread (in memory or on disk); check shape, dtype and gene names; return
    (matrix, genes)."""
    if use_raw and layer is not None:
        raise UserError("both adata.raw and a layer were asked for; choose one of them", {"use_raw": None, "layer": None})
    if use_raw:
        if adata.raw is None:
            raise UserError(f"{source} has no .raw matrix; read .X or a log-normalized layer instead",
                            {"use_raw": None, "layer": None})
        x, var, where = adata.raw.X, adata.raw.var, ".raw.X"
    elif layer is not None:
        if layer not in adata.layers:
            available = _preview(list(adata.layers.keys()), k=20) or "none"
            raise UserError(f"layer {layer!r} not found in {source}; available layers: {available}")
        x, var, where = adata.layers[layer], adata.var, f"layers[{layer!r}]"
    else:
        x, var, where = adata.X, adata.var, ".X"
    if x is None:
        raise UserError(f"{source} has no expression matrix in {where}; read a layer or adata.raw instead",
                        {"layer": None, "use_raw": None})
    n_cells, n_genes = x.shape
    if n_cells == 0:
        raise UserError(f"{source} contains no cells; check that the right file was passed")
    if n_genes == 0:
        raise UserError(f"{source} contains no genes in {where}; check the file or read another layer", {"layer": None})

    genes = _gene_names(var, gene_symbols, var_label="adata.raw.var" if use_raw else "adata.var", source=source)

    dtype = np.dtype(x.dtype)
    if dtype.kind not in "biuf":
        raise UserError(f"{where} of {source} has non-numeric dtype {dtype}; store expression values as numbers")
    return x, genes


def _all_cells(rows: slice | np.ndarray) -> bool:
    return isinstance(rows, slice) and rows == ALL_CELLS


def _same_rows(first: slice | np.ndarray, second: slice | np.ndarray) -> bool:
    if isinstance(first, slice) or isinstance(second, slice):
        return isinstance(first, slice) and isinstance(second, slice) and first == second
    return np.array_equal(first, second)


def _read_rows(x: Any, rows: slice | np.ndarray) -> sp.csr_matrix:
    """The cells `rows` of a matrix as stored (in memory or on disk) as a csr float32 copy in canonical form."""
    if isinstance(x, np.ndarray) or sp.issparse(x):
        matrix = _as_csr(x if _all_cells(rows) else x[rows])
    else:
        matrix = _read_backed(x, rows)
    matrix.sum_duplicates()  # canonical form, so checks on .data see one value per entry
    return matrix


def _as_csr(x: np.ndarray | sp.spmatrix) -> sp.csr_matrix:
    """A csr float32 copy of an in-memory matrix: validation and normalization must never change the user's."""
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float32, copy=True)
    return sp.csr_matrix(np.asarray(x, dtype=np.float32))


def _read_backed(x: Any, rows: slice | np.ndarray = ALL_CELLS) -> sp.csr_matrix:
    """The cells `rows` (a slice, or sorted positions) of a backed AnnData's matrix (an h5py dataset, or anndata's
    on-disk csr/csc matrix) as csr float32, read BACKED_CHUNK_CELLS cells at a time so a dense file is never
    densified whole; equal to reading it in memory."""
    if getattr(x, "format", None) == "csc":  # a column-compressed file has no cheap row blocks: read it once
        return _as_csr(x.to_memory()[rows])
    positions = np.arange(x.shape[0])[rows]
    if len(positions) == 0:
        return sp.csr_matrix((0, x.shape[1]), dtype=np.float32)
    contiguous = positions[-1] - positions[0] + 1 == len(positions)  # a slice reads far faster than a list of rows
    blocks = (positions[start:start + BACKED_CHUNK_CELLS] for start in range(0, len(positions), BACKED_CHUNK_CELLS))
    return sp.vstack([_as_csr(x[block[0]:block[-1] + 1] if contiguous else x[block]) for block in blocks],
                     format="csr", dtype=np.float32)


def _gene_names(var: pd.DataFrame, gene_symbols: str | None, *, var_label: str, source: str) -> list[str]:
    """var_names, or the var column `gene_symbols`; UserError when that column is missing or incomplete, and for
    duplicated names either way (a gene must map to one column of the model)."""
    if gene_symbols is None:
        genes = [str(g) for g in var.index]
        fix = "adata.var_names_make_unique()"
    else:
        if gene_symbols not in var.columns:
            available = _preview(list(var.columns), k=20) or "none"
            raise UserError(f"gene symbol column {gene_symbols!r} not found in {var_label} of {source}; available "
                            f"columns: {available}; name genes by one of them", {"gene_symbols": None})
        column = var[gene_symbols]
        missing = column.isna().to_numpy() | (column.astype(str).str.strip() == "").to_numpy()
        if missing.any():
            raise UserError(f"{int(missing.sum())} of {len(column)} genes have no name (NaN or empty) in "
                            f"{var_label}[{gene_symbols!r}] of {source}; drop those genes or fill in their names")
        genes = column.astype(str).tolist()
        fix = (f"set adata.var_names = adata.var[{gene_symbols!r}], run adata.var_names_make_unique() and name "
               "genes by var_names")
    genes, padded = _strip_names(genes)
    if padded:
        warnings.warn(f"{len(padded)} gene names in {source} have surrounding whitespace (e.g. {padded[0]!r}); "
                      "they are matched without it", stacklevel=4)
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if duplicated:
        where = "" if gene_symbols is None else f" (by {var_label}[{gene_symbols!r}])"
        stripped = " once surrounding whitespace is removed" if padded else ""
        raise UserError(
            f"{len(duplicated)} gene names occur more than once in {source}{where}{stripped} "
            f"({_preview(duplicated)}); make them unique first, e.g. {fix}"
        )
    return genes


def _strip_names(names: Iterable[object]) -> tuple[list[str], list[str]]:
    """Names without surrounding whitespace ('CD3E ' is CD3E), and the names that had some."""
    names = [str(n) for n in names]
    return [n.strip() for n in names], [n for n in names if n != n.strip()]


def _read_labels(adata: anndata.AnnData, label_key: str | None, *, require_labels: bool, source: str):
    """Return obs[label_key] as an object array of str, None when labels are absent and optional, else UserError.

    Each cell points to its type's one str object (8 bytes a cell): a numpy str array would hold 4 bytes per
    character of the longest name for every cell, 150 bytes a cell for the bundled types."""
    if label_key is None:
        if require_labels:
            raise UserError("cell type labels are required; name the obs column that holds them", {"label_key": None})
        return None
    if label_key not in adata.obs.columns:
        if not require_labels:
            return None
        available = _preview(list(adata.obs.columns), k=20) or "none"
        raise UserError(
            f"label column {label_key!r} not found in {source}; available obs columns: {available}; "
            "name the one with cell types", {"label_key": None}
        )
    column = adata.obs[label_key]
    missing = column.isna().to_numpy() | (column.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        message = (
            f"{int(missing.sum())} of {len(column)} cells have no label (NaN or empty) in obs[{label_key!r}] "
            f"of {source}"
        )
        if not require_labels:
            warnings.warn(f"{message}; labels ignored, so no metrics are computed", stacklevel=3)
            return None
        raise UserError(f"{message}; remove those cells first, e.g. adata = adata[adata.obs[{label_key!r}].notna()]")
    column = column.astype("category")
    return np.asarray(column.cat.categories.astype(str), dtype=object)[column.cat.codes.to_numpy()]


def _as_log_normalized(matrix: sp.csr_matrix, *, normalize: bool, source: str, any_scale: bool = False) -> sp.csr_matrix:
    """Check values are finite, non-negative and log-scale (any scale but raw counts with `any_scale`); normalize
    raw counts when asked (those beyond log scale)."""
    _check_values(matrix, source)
    values = matrix.data
    max_value = float(values.max()) if values.size else 0.0
    if max_value <= LOG_SCALE_MAX:
        if normalize:
            warnings.warn(
                f"not normalized: {source} already looks log-normalized (max value {max_value:.3g})",
                stacklevel=3,
            )
        return matrix
    if normalize:
        return _normalize_log1p(matrix)
    counts = np.all(values == np.round(values))
    if any_scale and not counts:
        return matrix
    if counts:
        found = f"looks like raw counts (integers up to {max_value:.0f})"
    else:
        found = f"has values up to {max_value:.3g}, too large to be log-normalized"
    raise UserError(
        f"{source} {found}; normalize it here (normalize_total to 1e4 + log1p) or run sc.pp.normalize_total "
        "and sc.pp.log1p yourself", {"normalize": True}
    )


def _check_values(matrix: sp.csr_matrix, source: str) -> None:
    """UserError for NaN, infinite or negative values."""
    values = matrix.data  # stored entries only; implicit zeros are valid in any representation
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.unique(np.searchsorted(matrix.indptr, np.flatnonzero(bad), side="right") - 1)
        raise UserError(
            f"{len(rows)} of {matrix.shape[0]} cells in {source} contain NaN or infinite values; "
            "remove those cells or fix the matrix"
        )
    if values.size and values.min() < 0:
        raise UserError(
            f"{source} has negative values (min {values.min():.3g}), so it looks scaled; read the log-normalized "
            "matrix from adata.raw or a log-normalized layer", {"use_raw": None, "layer": None}
        )


def _normalize_log1p(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """scanpy's normalize_total(target_sum=1e4) followed by log1p, on a new matrix."""
    counts = matrix.astype(np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()  # (cells,)
    # Cells without counts stay all-zero rather than dividing by zero.
    scale = np.divide(NORMALIZE_TARGET, totals, out=np.zeros_like(totals), where=totals > 0)
    normalized = sp.csr_matrix(sp.diags(scale) @ counts)
    normalized.data = np.log1p(normalized.data)
    return normalized.astype(np.float32)


def _drop_small_classes(data: ExpressionData, min_cells: int) -> ExpressionData:
    """Remove cells of classes with fewer than `min_cells` cells, warning which classes went."""
    names, counts = np.unique(data.labels, return_counts=True)
    small = names[counts < min_cells]
    if small.size == 0:
        return data
    keep = ~np.isin(data.labels, small)
    if not keep.any():
        raise UserError(f"every class has fewer than {min_cells} cells; lower the minimum cells per class",
                        {"min_cells_per_class": None})
    warnings.warn(
        f"dropped {small.size} classes with fewer than {min_cells} cells ({_preview(small.tolist())}): "
        f"{int((~keep).sum())} cells removed",
        stacklevel=3,
    )
    cell_ids = [c for c, k in zip(data.cell_ids, keep) if k]
    return replace(data, matrix=data.matrix[keep], cell_ids=cell_ids, labels=data.labels[keep])


def check_training_labels(data: ExpressionData, min_cells_per_class: int = 0) -> None:
    """Training needs at least two cell types, none of them named like prediction's UNASSIGNED; UserError else."""
    key = data.label_key
    column = f"obs[{key!r}]" if key is not None else "the labels"
    classes = np.unique(data.labels).tolist()
    check_class_names(classes, column, f"rename it in {column} (e.g. to 'Unlabelled') or drop those cells")
    if len(classes) >= 2:
        return
    in_data = data.adata.obs[key].astype(str).nunique() if key in data.adata.obs.columns else len(classes)
    if min_cells_per_class > 0 and in_data > len(classes):
        raise UserError(f"only one cell type ({classes[0]!r}) in {column} has at least {min_cells_per_class} cells, "
                        "and a classifier needs two or more; lower the minimum cells per class",
                        {"min_cells_per_class": None})
    raise UserError(f"{column} holds only one cell type ({classes[0]!r}), and a classifier needs two or more; "
                    "name the obs column with the cell types, or add cells of other types", {"label_key": None})


def check_class_names(classes: Iterable[object], where: str, fix: str) -> None:
    """UserError when a class would read as prediction's UNASSIGNED (in any letter case, with or without surrounding
    whitespace), so predictions could not tell it from uncertain cells; the message names it, `where` it is and `fix`."""
    clashing = [str(c) for c in classes if str(c).strip().casefold() == UNASSIGNED.casefold()]
    if clashing:
        raise UserError(f"cell type {clashing[0]!r} in {where} clashes with {UNASSIGNED!r}, the label prediction "
                        f"gives cells it cannot name; {fix}")


# ----------------------------------------------------------------------------------------------------------
# Data: genes, tokens, labels, splits


def align_genes(
    data: ExpressionData, reference_genes: Sequence[str], *, allow_missing: bool = False, min_overlap: float = 0.5
) -> ExpressionData:
    """Reorder columns to `reference_genes` (the model's genes): missing genes become zeros, extra genes go.

    Warns with the number of missing genes. UserError when no gene matches, or when fewer than `min_overlap`
    of the reference genes are present unless `allow_missing`.
    """
    reference_genes = [str(g) for g in reference_genes]
    wanted, padded = _strip_names(reference_genes)  # the data's names were stripped when it was read
    if padded:
        warnings.warn(f"{len(padded)} of the model's gene names have surrounding whitespace (e.g. {padded[0]!r}); "
                      "they are matched without it", stacklevel=2)
    source_column = pd.Index(data.genes).get_indexer(wanted)  # (ref genes,) -1 where missing
    present = np.flatnonzero(source_column >= 0)
    n_ref, n_missing = len(reference_genes), len(reference_genes) - present.size
    case_hint = _letter_case_hint(data.genes, wanted, source_column) if n_missing else ""
    if present.size == 0:
        column_hint, column_option = _gene_column_hint(data.adata, wanted, present.size)
        raise UserError(
            f"none of the {n_ref} model genes are in the data (e.g. {_preview(reference_genes, k=3)}); check "
            "that both use the same gene naming (symbols vs Ensembl IDs, species)" + case_hint + column_hint,
            column_option,
        )
    overlap = present.size / n_ref
    if overlap < min_overlap and not allow_missing:
        column_hint, column_option = _gene_column_hint(data.adata, wanted, present.size)
        raise UserError(
            f"only {present.size} of {n_ref} model genes ({overlap:.0%}) are in the data; check the gene naming, "
            "or allow missing genes (filled with zeros)" + case_hint + column_hint,
            {"allow_missing_genes": True} | column_option,
        )
    if n_missing:
        n_extra = len(data.genes) - present.size
        warnings.warn(
            f"{n_missing} of {n_ref} model genes are missing from the data and were filled with zeros "
            f"({n_extra} data genes not used by the model were dropped)" + case_hint,
            stacklevel=2,
        )
    # A 0/1 selection matrix (data genes, ref genes) moves columns while keeping everything sparse.
    selection = sp.csr_matrix(
        (np.ones(present.size, dtype=np.float32), (source_column[present], present)),
        shape=(len(data.genes), n_ref),
    )
    matrix = sp.csr_matrix(data.matrix @ selection)  # (cells, ref genes)
    return replace(data, matrix=matrix, genes=reference_genes)


def _letter_case_hint(genes: Sequence[str], wanted: Sequence[str], source_column: np.ndarray) -> str:
    """'; 132 genes differ only in letter case (e.g. 'cd3e' in the data vs 'CD3E' in the model) ...' for missing
    model genes that an unused data gene spells in another case; '' when there are none. Not matched on purpose:
    case also tells species apart (mouse Cd3e, human CD3E)."""
    unused = set(genes) - {genes[i] for i in source_column[source_column >= 0]}
    by_case = {}
    for gene in sorted(unused):
        by_case.setdefault(gene.casefold(), gene)
    pairs = [(by_case[gene.casefold()], gene) for gene, column in zip(wanted, source_column)
             if column < 0 and gene.casefold() in by_case]
    if not pairs:
        return ""
    ours, theirs = pairs[0]
    return (f"; {len(pairs)} genes differ only in letter case (e.g. {ours!r} in the data vs {theirs!r} in the model): "
            "if both are the same species, rename them to the model's spelling")


def _gene_column_hint(adata: anndata.AnnData, reference_genes: Sequence[str], n_matched: int) -> tuple[str, dict]:
    """('; var column C holds N of them: name genes by it', {"gene_symbols": C}) for the var column that holds more
    of the model's genes than the names just matched (Ensembl IDs as var_names, symbols in a column), else ('', {})."""
    wanted = pd.Index(reference_genes)
    best, best_count = None, n_matched
    for var in (adata.var, adata.raw.var if adata.raw is not None else None):
        for name in [] if var is None else var.columns:
            column = var[name]
            if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)
                    or isinstance(column.dtype, pd.CategoricalDtype)):
                continue  # numbers and flags cannot hold gene names
            count = int(wanted.isin(column.astype(str).str.strip()).sum())
            if count > best_count:
                best, best_count = name, count
    if best is None:
        return "", {}
    return f"; var column {best!r} holds {best_count} of them: name genes by it", {"gene_symbols": best}


class Batch(NamedTuple):
    """One batch from `BinnedDataset`: tokens (B, G+1) int64 and labels (B,) int64 (UNLABELLED if none)."""

    tokens: torch.Tensor
    labels: torch.Tensor


class BinnedDataset(torch.utils.data.Dataset):
    """Cells of a csr matrix as scBERT tokens; only the rows of a batch are ever densified.

    Use with `DataLoader(dataset, batch_size=..., collate_fn=collate_batch)`: the loader then calls
    `__getitems__` once per batch. Without labels every label is UNLABELLED (-1), so batches always unpack
    as `tokens, labels`.
    """

    def __init__(self, matrix: sp.spmatrix, binning: Binning, labels: np.ndarray | None = None):
        self.matrix = sp.csr_matrix(matrix)  # (cells, genes)
        self.binning = binning
        n_cells = self.matrix.shape[0]
        if labels is None:
            self.labels = torch.full((n_cells,), UNLABELLED, dtype=torch.int64)
        else:
            self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
            if self.labels.shape != (n_cells,):
                raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match {n_cells} cells")

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        index = np.asarray(indices, dtype=np.int64)
        rows = self.matrix[index].toarray()  # (B, G): the only dense copy
        return Batch(self.binning.tokens(rows), self.labels[torch.from_numpy(index)])

    def tokens(self, indices: Sequence[int]) -> torch.Tensor:
        """The tokens (len(indices), genes + 1) of some cells at once, without a loader."""
        return self.__getitems__(indices).tokens

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = self.__getitems__([index])
        return tokens[0], labels[0]  # (G+1,), ()


def collate_batch(batch: Batch | Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    """DataLoader collate_fn: pass a `Batch` from `__getitems__` through; stack single items otherwise."""
    if isinstance(batch, Batch):
        return batch
    tokens, labels = zip(*batch)
    return Batch(torch.stack(tokens), torch.stack(labels))


def encode_labels(labels: np.ndarray, classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map string labels to ints; classes default to the sorted unique labels. UserError on unknown labels."""
    labels = np.asarray(labels, dtype=str)
    classes = sorted(np.unique(labels).tolist()) if classes is None else [str(c) for c in classes]
    codes = pd.Index(classes).get_indexer(labels)  # (cells,) -1 where unknown
    unknown = np.unique(labels[codes < 0]).tolist()
    if unknown:
        raise UserError(
            f"{int((codes < 0).sum())} cells have labels outside the model's {len(classes)} classes "
            f"({_preview(unknown)}); remove those cells or run without labels"
        )
    return codes.astype(np.int64), classes


def stratified_splits(
    labels_int: np.ndarray,
    n_splits: int = 1,
    test_size: float = 0.2,
    seed: int = 0,
    *,
    class_names: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, val_idx) pairs: one StratifiedShuffleSplit split, or StratifiedKFold folds for n_splits >= 2.

    UserError when a class is too small.

    `class_names` (indexed by label) only make the error message readable.
    """
    labels_int = np.asarray(labels_int)
    classes, counts = np.unique(labels_int, return_counts=True)
    tiny = classes[counts < 2]
    if tiny.size:
        names = [class_names[c] if class_names is not None else str(c) for c in tiny]
        raise UserError(
            f"{tiny.size} classes have fewer than 2 cells and cannot be split into train and validation "
            f"({_preview(names)}); drop classes with fewer than 2 cells (or more)", {"min_cells_per_class": 2}
        )
    if n_splits == 1:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    else:
        # Disjoint validation folds that together cover every cell once: each fold model is validated on cells
        # it never trained on, and the fold ensemble's out-of-fold predictions cover the whole training set.
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        return list(splitter.split(np.zeros(len(labels_int)), labels_int))
    except ValueError as e:  # e.g. fewer validation cells than classes
        raise UserError(
            f"cannot split {len(labels_int)} cells of {classes.size} classes with test_size={test_size}: "
            f"{_one_line(e)}; use more cells, a different validation fraction, or drop small classes",
            {"min_cells_per_class": None},
        ) from e


# ----------------------------------------------------------------------------------------------------------
# Metrics (numpy in, numpy or plain Python out; natural log)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy over the last axis in nats; 0 * log 0 counts as 0."""
    return -np.sum(probs * np.log(np.clip(probs, PROB_EPS, None)), axis=-1)


def call_weights(class_counts: Sequence[int] | None, balance: float) -> np.ndarray | None:
    """Weights (C,) that turn the most probable class into the call that favours rarer types: training share^-balance.

    Calls maximise p(c | cell) · share(c)^-balance: 0 is the plain argmax (accuracy), 1 the argmax of p/share
    (balanced accuracy). Rare types lose ties to common ones under the argmax, and macro-F1 weighs every type
    alike. On the design splits' inner validation cells (benchmarks/calibration_inner.py's runs: PBMC seeds 11
    and 12, stand-in seed 11; no benchmark test cell), 0.75 raised the final model's macro-F1 by +0.010, +0.103
    and +0.025 at accuracy 0.000, 0.000 and -0.009; 0.5 by +0.010, +0.045 and +0.034; 1.0 by +0.028, +0.075
    and +0.026 but cost up to 0.027 accuracy. Probabilities are unchanged: NLL and ECE stay theirs.
    None (plain argmax) without counts (checkpoints written before they were stored) or with balance 0.
    """
    if class_counts is None or not balance:
        return None
    shares = np.asarray(class_counts, dtype=np.float64)
    shares = np.maximum(shares, 1.0) / shares.sum()  # a type without training cells is called as the rarest one
    return shares**-balance


def uncertainty_summary(prob_samples: np.ndarray, predictive: np.ndarray | None = None,
                        weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell predictions and uncertainties from Monte Carlo class probabilities (S, N, C).

    mean_probs is the predictive distribution (N, C): the samples' mean, or `predictive` when the caller pools
    them otherwise (an ensemble's members, see `pool_members`). pred is its most probable class, or with
    `weights` (C,) (see `call_weights`) the largest of mean_probs · weights. entropy = H[mean_probs] (total),
    expected_entropy = mean H[p] (aleatoric), mutual_info = H[sample mean] − expected_entropy (epistemic: the
    samples' disagreement); pred_std = std across samples of the predicted class's probability.
    """
    samples = np.asarray(prob_samples, dtype=np.float64)  # (S, N, C)
    if samples.ndim != 3:
        raise ValueError(f"expected (samples, cells, classes) probabilities, got shape {samples.shape}")
    mixture = samples.mean(axis=0)  # (N, C)
    mean_probs = mixture if predictive is None else np.asarray(predictive, dtype=np.float64)
    pred = (mean_probs if weights is None else mean_probs * weights).argmax(axis=1)  # (N,)
    cells = np.arange(samples.shape[1])
    expected_entropy = entropy(samples).mean(axis=0)
    return {
        "mean_probs": mean_probs,
        "pred": pred,
        "confidence": mean_probs[cells, pred],
        "entropy": entropy(mean_probs),
        "expected_entropy": expected_entropy,
        # Non-negative by Jensen's inequality; the clip only removes float round-off like -1e-17.
        "mutual_info": np.maximum(entropy(mixture) - expected_entropy, 0.0),
        "pred_std": samples[:, cells, pred].std(axis=0),
    }


def pool_members(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """An ensemble's predictive distribution (N, C) from its members' (N, C): the normalised geometric mean.

    Each member is already a posterior average over its own samples. Averaging the members' probabilities
    arithmetically left the 5-fold ensemble underconfident (mean confidence 0.11 below accuracy on inner
    validation splits, ECE 0.13); the geometric mean (log-linear pooling) matched confidence to accuracy
    (ECE 0.07, NLL 0.54 → 0.45) without changing accuracy. One member: returned unchanged.
    """
    if len(member_probs) == 1:
        return np.asarray(member_probs[0], dtype=np.float64)
    log_probs = np.log(np.clip(np.asarray(member_probs, dtype=np.float64), PROB_EPS, None)).mean(axis=0)  # (N, C)
    log_probs -= log_probs.max(axis=1, keepdims=True)
    pooled = np.exp(log_probs)
    return pooled / pooled.sum(axis=1, keepdims=True)


def tempered(prob_samples: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) for every sample, from probabilities (S, N, C): log p differs from the logits by a
    per-row constant, which the softmax removes."""
    logits = np.log(np.clip(np.asarray(prob_samples, dtype=np.float64), PROB_EPS, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


def fit_temperature(prob_samples: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the NLL of the sample-averaged softmax(logits / T) on labelled
    cells (Guo et al., 2017): one parameter, so it recalibrates confidence without changing any prediction."""
    labels = np.asarray(labels)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        probs = tempered(prob_samples, math.exp(log_t)).mean(axis=0)
        return float(-np.log(np.clip(probs[rows, labels], PROB_EPS, None)).mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def paired_comparison(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, *, n_boot: int = 2000,
                      seed: int = 0, calls: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Two models' mean probabilities (cells, classes) on the same labelled cells, compared cell by cell.

    changed: share of cells whose predicted type differs (the argmax of the probabilities, or the two models'
    `calls` when given, e.g. those of their posterior means); nll_diff: mean of candidate − reference per-cell NLL,
    with nll_diff_upper, the 95 % upper bound of a paired bootstrap. Pairing removes the cell-to-cell spread that
    makes one macro-F1 of a small validation set too noisy to decide on.
    """
    rows, labels = np.arange(len(labels)), np.asarray(labels)
    nll = [-np.log(np.clip(np.asarray(p, dtype=np.float64)[rows, labels], PROB_EPS, None)) for p in (reference, candidate)]
    diff = nll[1] - nll[0]  # (cells,)
    resampled = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    return {
        "changed": float(np.mean(np.not_equal(*calls) if calls is not None
                                 else np.argmax(reference, 1) != np.argmax(candidate, 1))),
        "nll_diff": float(diff.mean()),
        "nll_diff_upper": float(np.quantile(diff[resampled].mean(axis=1), 0.95)),
    }


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count over equal-width confidence bins (NaN for empty bins)."""
    probs = np.asarray(probs, dtype=np.float64)  # (N, C)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi]; confidence 0 falls into the first bin and anything above 1 (round-off) into the last.
    bin_index = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(bin_index, minlength=n_bins)
    filled = count > 0
    mean_confidence = np.full(n_bins, np.nan)
    accuracy = np.full(n_bins, np.nan)
    np.divide(np.bincount(bin_index, weights=confidence, minlength=n_bins), count, out=mean_confidence, where=filled)
    np.divide(np.bincount(bin_index, weights=correct, minlength=n_bins), count, out=accuracy, where=filled)
    return {"edges": edges, "confidence": mean_confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over confidence bins of |accuracy - confidence| * bin_count / N."""
    bins = reliability_bins(probs, labels, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(gaps * bins["count"][filled]) / n)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                           pred: np.ndarray | None = None) -> dict[str, Any]:
    """JSON-ready accuracy, F1s, per-class scores, confusion matrix, ECE, NLL and Brier score.

    pred (N,): the calls scored by accuracy, F1s and the confusion matrix (default: the most probable class);
    ECE, NLL and Brier score judge the probabilities themselves.

    macro/weighted F1 follow sklearn's default and average over classes present in labels or predictions;
    `per_class` lists every class (support 0 for absent ones).
    """
    probs = np.asarray(probs, dtype=np.float64)  # (N, C)
    labels = np.asarray(labels, dtype=np.int64)  # (N,)
    n_cells, n_classes = probs.shape
    if labels.shape != (n_cells,) or len(class_names) != n_classes or n_cells == 0:
        raise ValueError(
            f"probs {probs.shape}, labels {labels.shape} and {len(class_names)} class names do not fit together"
        )
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, dtype=np.int64)
    class_ids = np.arange(n_classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=class_ids, zero_division=0
    )
    p_true = probs[np.arange(n_cells), labels]
    one_hot = np.eye(n_classes)[labels]  # (N, C)
    return {
        "n_cells": int(n_cells),
        "accuracy": float(np.mean(pred == labels)),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
        "per_class": {
            str(name): {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(labels, pred, labels=class_ids).tolist(),  # rows true, cols pred
        "ece": expected_calibration_error(probs, labels),
        "nll": float(np.mean(-np.log(np.clip(p_true, PROB_EPS, None)))),
        "brier": float(np.mean(np.sum((probs - one_hot) ** 2, axis=1))),
    }


def misclassification_auroc(score: np.ndarray, correct: np.ndarray) -> float:
    """How well an uncertainty score (higher = more likely wrong) ranks errors first; NaN if all right/all wrong."""
    wrong = ~np.asarray(correct, dtype=bool)
    if wrong.all() or not wrong.any():
        return float("nan")
    return float(roc_auc_score(wrong, np.asarray(score, dtype=np.float64)))


def accuracy_at_coverage(
    score: np.ndarray, correct: np.ndarray, coverages: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.5)
) -> dict[str, float]:
    """Accuracy on the ceil(coverage * N) cells (at least 1) with the lowest uncertainty score.

    Keys are str(coverage), e.g. "0.9". Ties keep the input order. NaN when there are no cells.
    """
    score = np.asarray(score, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.argsort(score, kind="stable")  # most certain first
    result = {}
    for coverage in coverages:
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {coverage}")
        if correct.size == 0:
            result[str(float(coverage))] = float("nan")
            continue
        # The tiny subtraction stops round-off (0.7 * 10 = 7.000000000000001) from keeping an extra cell.
        kept = max(1, math.ceil(coverage * correct.size - 1e-9))
        result[str(float(coverage))] = float(correct[order[:kept]].mean())
    return result


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def _current_umask() -> int:
    """The process umask (only readable by setting it; fine for single-threaded CLIs)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """The path of a new temp file next to `path`, for writers that need a path (h5py); on success it replaces
    `path` in one step.

    Readers never see a half-written file; on an exception the old file stays and the temp file is removed. An
    OSError (disk full, no permission) becomes an OutputError naming `path`, so the CLIs print one line.
    """
    path = Path(path)
    _remove_leftovers(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)  # named after its target
        os.close(fd)
    except OSError as e:
        raise OutputError(path, e) from e
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp creates 0600; give outputs normal permissions
        os.replace(tmp_name, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # best effort: the original error matters more
            os.unlink(tmp_name)
        if isinstance(e, OSError):
            raise OutputError(path, e) from e
        raise


def _remove_leftovers(path: Path) -> None:
    """Remove the temp files (.tmp-NAME-XXXXXXXX) that killed writes of `path` left: they hold nothing anyone needs,
    and a rerun must not trip over them. Best effort."""
    prefix = f".tmp-{path.name}-"
    with contextlib.suppress(OSError):
        for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
            if "-" not in leftover.name[len(prefix):]:  # mkstemp's suffix has none; '.tmp-NAME-x-XXXX' is another's
                leftover.unlink(missing_ok=True)


def _check_free_space(path: Path, size: int) -> None:
    """OutputError (no space left) when the filesystem of `path` has clearly less room than `size` bytes, so a write
    that cannot fit fails before it fills the disk; a write that fails anyway is still reported by atomic_path."""
    try:
        stats = os.statvfs(path.parent)
    except (OSError, AttributeError):  # no statvfs (Windows) or an odd filesystem: let the write tell
        return
    blocks = stats.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stats.f_bavail  # root may use reserve
    free = blocks * stats.f_frsize
    if size > free:
        cause = OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({_size(size)} needed, {_size(free)} free)")
        raise OutputError(path, cause)


def _size(n: int) -> str:
    """A byte count for people: '950 bytes', '56.5 kB', '3.2 GB'."""
    for power, unit in ((9, "GB"), (6, "MB"), (3, "kB")):
        if n >= 10**power:
            return f"{n / 10**power:.1f} {unit}"
    return f"{n} bytes"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path` ('w' text or 'wb' binary); on success it replaces `path` in one step.

    See `atomic_path`: no half-written files, no temp file left on an exception, OSError becomes OutputError.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())  # data on disk before the rename, so a crash cannot leave an empty file in place


def _json_default(obj: object) -> object:
    """Let json write numpy scalars/arrays and paths; anything else is still a TypeError."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _nan_to_none(obj: Any) -> Any:
    """NaN/inf become null: json.dump would write bare NaN, which is not JSON and breaks other readers."""
    if isinstance(obj, float | np.floating) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return _nan_to_none(obj.tolist())
    return obj


def write_bytes(path: str | os.PathLike, content: bytes | memoryview) -> None:
    """Write `content` atomically, refusing up front (OutputError) when the disk clearly lacks room for it."""
    _check_free_space(Path(path), len(content) if isinstance(content, bytes) else content.nbytes)
    with atomic_write(path, "wb") as handle:
        handle.write(content)


def write_h5ad(path: str | os.PathLike, adata: anndata.AnnData) -> None:
    """`adata.write_h5ad(path)`, atomic and safe on a full disk: the HDF5 file is built in memory, then written as
    plain bytes (`write_bytes`).

    HDF5 writing to a disk that fills mid-file fails in its deallocators (pages of tracebacks, even a bus error)
    and leaves a torn file; from memory a full disk is one OSError from write(), reported as an OutputError.
    Like `AnnData.write_h5ad`, string columns of obs and var become categoricals (in `adata` too).
    """
    adata.strings_to_categoricals()
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    buffer = io.BytesIO()
    try:
        with h5py.File(buffer, "w") as handle:
            write_elem(handle, "/", adata)
    except OSError as e:  # nothing touches the disk here, but keep the one-line contract for any h5py failure
        raise OutputError(path, e) from e
    write_bytes(path, buffer.getbuffer())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON (sorted keys, indent 2, NaN as null) atomically."""
    with atomic_write(path) as f:
        json.dump(_nan_to_none(obj), f, indent=2, sort_keys=True, default=_json_default, allow_nan=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; UserError when it is missing, unreadable or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({_one_line(e)}); fix or regenerate the file") from e
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check that it is a readable file") from e


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    """Versions of Python and the main packages, recorded in checkpoints and run metadata."""
    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "cuda": str(torch.version.cuda)}
    for name in ("numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "einops"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks the local rank's GPU when CUDA is available, else the CPU; explicit names are checked."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"{name!r} is not a device name; use auto, cpu, cuda or cuda:N", {"device": None}) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asks for CUDA but no GPU is visible; use the CPU", {"device": "cpu"})
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it, fp16 otherwise; a no-op on the CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def option_hint(options: dict[str, Any]) -> str:
    """A UserError's settings in the command line's spelling: ' (command line: --layer, --device cpu)'."""
    flags = []
    for name, value in options.items():
        if value is False:
            flags.append(f"--no_{name}")
        elif value is None or value is True:
            flags.append(f"--{name}")
        else:
            flags.append(f"--{name} {value}")
    return f" (command line: {', '.join(flags)})" if flags else ""



# Option names of the CLIs, True for on/off flags: registered by options.py, read by `python_spelling`.
_OPTION_IS_FLAG: dict[str, bool] = {}
_FLAG_PATTERN = re.compile(r"--(no[_-])?([a-z][a-z0-9_]*)(?:[ =]('[^']*'|\"[^\"]*\"|-?[0-9][^\s,;)]*))?")


def register_option_names(names: dict[str, bool]) -> None:
    _OPTION_IS_FLAG.update(names)


def python_spelling(text: str) -> str:
    """A message's command-line flags as Python arguments: --overwrite -> overwrite=True, --cv_splits 3 ->
    cv_splits=3, --no_pos_embed -> pos_embed=False, --dim -> dim; unknown flags stay as they are."""
    def spell(match: re.Match) -> str:
        negated, name, value = match.groups()
        if name not in _OPTION_IS_FLAG or (negated and not _OPTION_IS_FLAG[name]):
            return match.group(0)
        if _OPTION_IS_FLAG[name]:
            return f"{name}={not negated}" + (f" {value}" if value else "")
        return f"{name}={value}" if value else name
    return _FLAG_PATTERN.sub(spell, text)

def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_cli(job: Any, *, interrupted: str = "interrupted; rerun the command") -> int:
    """Run a CLI's job; a UserError becomes one line on stderr and exit status 2 (no traceback).

    Warnings (e.g. missing genes filled with zeros) print as one 'warning: ...' line each. Ctrl-C prints the one
    line `interrupted` (what to do next) and exits with status 130, as shells do for SIGINT.
    """
    warnings.formatwarning = _format_warning
    try:
        job()
    except KeyboardInterrupt:
        print(("\n" if sys.stderr.isatty() else "") + interrupted, file=sys.stderr)  # past a terminal's ^C echo
        return 130
    except UserError as e:
        print(f"error: {e.cli_message}", file=sys.stderr)
        return 2
    except OSError as e:
        # Safety net for file errors outside atomic_write (e.g. opening the log file); an OSError without a file
        # name is not the user's to fix, so its traceback stays.
        if e.filename is None:
            raise
        print(f"error: cannot access {e.filename}: {_os_cause(e)}; check the path, free space and permissions",
              file=sys.stderr)
        return 2
    return 0
