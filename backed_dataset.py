"""Training from an .h5ad file larger than memory (--backed): cells read from disk a batch at a time.

In memory, `utils.load_dataset` reads the whole matrix and `BinnedDataset` serves batches from it. Backed, the
matrix stays in the file: `BackedMatrix` reads the rows a batch asks for (in file order, adjacent rows in one read,
the row pointers held in memory), and every step that needs all cells -- the value checks, the data fingerprint,
the quantile cut points -- passes over the file CHUNK_CELLS cells at a time. A chunk is processed as the in-memory
path processes the whole matrix (float32, duplicate entries summed, normalized cell by cell, genes aligned by the
same selection matrix), so both paths give the same tokens, fingerprint and cut points.

The file's matrix must be stored by rows (csr) or dense; a column-compressed (csc) matrix has no cheap rows.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata
import h5py
import numpy as np
import scipy.sparse as sp
from anndata.io import read_elem

from binning import QUANTILE_SAMPLE, Binning, binning_of_sample
from binning import quantile_binning as quantile_binning_in_memory
from utils import (
    BinnedDataset,
    ExpressionData,
    UserError,
    _as_log_normalized,
    _drop_small_classes,
    _gene_names,
    _log_scale_problem,
    _normalize_log1p,
    _read_labels,
    align_genes,
)

CHUNK_CELLS = 10_000  # cells per pass step: 10,000 x 20,000 genes at 10 % density is ~160 MB of csr
# In memory, a training run holds the file's matrices as anndata reads them plus the validated float32 copy and one
# normalized or gene-aligned copy: about three times 8 bytes (value + column index) per stored value.
IN_MEMORY_COPIES = 3
MEMORY_SHARE = 0.5  # automatic --backed above this share of the available memory: the model and batches need the rest


# --------------------------------------------------------------------------------------------------------------
# The matrix on disk
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BackedMatrix:
    """The (cells, genes) matrix `key` of the .h5ad file `path`, read on demand: its rows `rows` (file rows,
    increasing), normalized per cell when `normalize`, and its columns chosen by `selection` (file genes, genes),
    `align_genes`' 0/1 matrix. Indexing with cell positions gives a csr float32 block in the order asked for."""

    path: Path
    key: str  # "X", "raw/X" or "layers/NAME"
    rows: np.ndarray  # (cells,) int64
    normalize: bool = False
    selection: sp.csr_matrix | None = None
    reason: str = "--backed"  # why the run reads it from disk, for the log
    _handle: tuple[int, h5py.File] | None = field(default=None, repr=False, compare=False)
    _indptr: np.ndarray | None = field(default=None, repr=False, compare=False)  # (file cells + 1,) once read

    @classmethod
    def open(cls, path: Path, key: str) -> BackedMatrix:
        with h5py.File(path, "r") as file:
            n_cells = _stored_shape(file[key])[0]
        return cls(path, key, np.arange(n_cells, dtype=np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        genes = _stored_shape(self._file()[self.key])[1] if self.selection is None else self.selection.shape[1]
        return len(self.rows), genes

    def __getitem__(self, cells: np.ndarray) -> sp.csr_matrix:
        """Rows at positions `cells` (any order, repeats allowed) as csr float32, processed as in memory."""
        wanted = self.rows[np.asarray(cells, dtype=np.int64)]
        file_rows, where = np.unique(wanted, return_inverse=True)  # sorted: h5py reads forward
        block = self._read(file_rows)
        if self.normalize:
            block = _normalize_log1p(block)
        if self.selection is not None:
            block = sp.csr_matrix(block @ self.selection)
        return block[where]

    def chunks(self) -> Iterator[sp.csr_matrix]:
        """Consecutive blocks of CHUNK_CELLS rows covering the matrix, indices sorted (canonical csr)."""
        for start in range(0, len(self.rows), CHUNK_CELLS):
            block = self[np.arange(start, min(start + CHUNK_CELLS, len(self.rows)))]
            block.sort_indices()
            yield block

    def with_rows(self, cells: np.ndarray) -> BackedMatrix:
        return replace(self, rows=self.rows[cells], _handle=None)

    def with_selection(self, selection: sp.csr_matrix) -> BackedMatrix:
        return replace(self, selection=selection, _handle=None)

    def describe(self) -> str:
        return f"{self.shape[0]} cells of {self.path} ({self.key}) read from disk batch by batch: {self.reason}"

    def _file(self) -> h5py.File:
        # h5py handles do not survive fork: each DataLoader worker (a new pid) opens its own
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), h5py.File(self.path, "r"))
        return self._handle[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def _read(self, file_rows: np.ndarray) -> sp.csr_matrix:
        """File rows (sorted, unique) as the in-memory path reads them: csr float32, duplicate entries summed."""
        stored = self._file()[self.key]
        n_genes = _stored_shape(stored)[1]
        if isinstance(stored, h5py.Dataset):
            return sp.csr_matrix(np.asarray(stored[file_rows], dtype=np.float32))
        if self._indptr is None:
            self._indptr = stored["indptr"][:].astype(np.int64)
        indptr = self._indptr
        runs = np.split(file_rows, np.flatnonzero(np.diff(file_rows) > 1) + 1)  # adjacent rows: one read each
        values, columns = stored["data"], stored["indices"]  # looked up once: h5py resolves names slowly
        data, indices = [], []
        for run in runs:
            start, stop = indptr[run[0]], indptr[run[-1] + 1]
            data.append(values[start:stop])
            indices.append(columns[start:stop])
        counts = indptr[file_rows + 1] - indptr[file_rows]
        block = sp.csr_matrix((np.concatenate(data).astype(np.float32), np.concatenate(indices),
                               np.concatenate([[0], np.cumsum(counts)])), shape=(len(file_rows), n_genes))
        block.sum_duplicates()
        return block


def _stored_shape(stored: h5py.Group | h5py.Dataset) -> tuple[int, int]:
    if isinstance(stored, h5py.Dataset):
        return tuple(stored.shape)
    return tuple(int(n) for n in stored.attrs.get("shape", stored.attrs.get("h5sparse_shape")))


def _stored_format(stored: h5py.Group | h5py.Dataset) -> str:
    if isinstance(stored, h5py.Dataset):
        return "dense"
    kind = stored.attrs.get("encoding-type", stored.attrs.get("h5sparse_format", ""))
    return str(kind).removesuffix("_matrix")


def _stored_values(stored: h5py.Group | h5py.Dataset) -> int:
    return stored.size if isinstance(stored, h5py.Dataset) else stored["data"].shape[0]


# --------------------------------------------------------------------------------------------------------------
# Backed or in memory
# --------------------------------------------------------------------------------------------------------------


def available_memory() -> int:
    """Bytes the system can still give without swapping (MemAvailable: free memory plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def in_memory_bytes(path: Path) -> int:
    """What reading `path` whole would take: IN_MEMORY_COPIES x 8 bytes per stored value of its matrices."""
    values = 0
    with h5py.File(path, "r") as file:
        keys = ["X", "raw/X"] + [f"layers/{name}" for name in file.get("layers", {})]
        for key in keys:
            if key in file:
                values += _stored_values(file[key])
    return IN_MEMORY_COPIES * 8 * values


def backed_decision(path: str | os.PathLike | None, asked: bool) -> tuple[bool, str]:
    """Whether to train from the file on disk, and why: asked (--backed), or automatic when reading it whole would
    take more than MEMORY_SHARE of the available memory (`in_memory_bytes`). Only a file can be read backed."""
    if path is None:
        if asked:
            raise UserError("--backed reads the training data from a file; pass it with --data_path (fit(): an AnnData "
                            "read with anndata.read_h5ad(path, backed='r'))", {"data_path": None})
        return False, "the bundled example is read in memory"
    if asked:
        return True, "--backed"
    try:
        needed, available = in_memory_bytes(Path(path)), available_memory()
    except (OSError, KeyError, TypeError):
        return False, ""  # no .h5ad there: the in-memory reader says what is wrong
    if needed > MEMORY_SHARE * available:
        return True, (f"reading it whole would take about {needed / 2**30:.1f} GiB of the {available / 2**30:.1f} "
                      "GiB available: training from the file on disk (--backed)")
    return False, f"about {needed / 2**30:.1f} GiB in memory of {available / 2**30:.1f} GiB available"


# --------------------------------------------------------------------------------------------------------------
# Reading and checking a file backed
# --------------------------------------------------------------------------------------------------------------


def load_backed_dataset(path: str | os.PathLike, *, label_key: str | None, layer: str | None = None,
                        use_raw: bool | None = None, normalize: bool = False, min_cells_per_class: int = 0,
                        gene_symbols: str | None = None, any_scale: bool = False) -> ExpressionData:
    """`utils.load_dataset`'s ExpressionData with the matrix left on disk (a BackedMatrix): the same checks and
    messages, the values checked a chunk at a time."""
    path = Path(path)
    source = str(path)
    obs = _read_frame(path, "obs")
    labels = _read_labels(anndata.AnnData(obs=obs), label_key, require_labels=True, source=source)
    with _h5ad(path) as file:
        matrix = BackedMatrix.open(path, _matrix_key(file, layer=layer, use_raw=use_raw, source=source))
    stand_in = value_stand_in(matrix)
    if use_raw is None and layer is None:
        matrix, stand_in = _usable_matrix(matrix, stand_in, normalize=normalize or any_scale, source=source)
    var = _read_frame(path, "raw/var" if matrix.key == "raw/X" else "var")
    genes = _gene_names(var, gene_symbols, var_label="adata.raw.var" if matrix.key == "raw/X" else "adata.var",
                        source=source)
    matrix = replace(matrix, normalize=_as_log_normalized(stand_in, normalize=normalize, source=source,
                                                          any_scale=any_scale) is not stand_in)
    metadata = anndata.AnnData(obs=obs, var=var)  # no matrix: later checks read only obs and var
    data = ExpressionData(matrix, genes, [str(c) for c in obs.index], labels, metadata, label_key)
    if min_cells_per_class > 0:
        # _drop_small_classes subsets data.matrix by rows: given the cell positions, it returns those it keeps
        kept = _drop_small_classes(replace(data, matrix=np.arange(len(labels))), min_cells_per_class)
        data = replace(kept, matrix=matrix.with_rows(kept.matrix))
    return data


def _h5ad(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"cannot read {path} as AnnData: {e}; save your data with adata.write_h5ad()") from e


def _read_frame(path: Path, key: str):
    """obs, var or raw/var of the file as a DataFrame (the matrices stay on disk)."""
    with _h5ad(path) as file:
        if key not in file:
            raise UserError(f"{path} has no {key}: it is not an AnnData file; save your data with adata.write_h5ad()")
        return read_elem(file[key])


def _matrix_key(file: h5py.File, *, layer: str | None, use_raw: bool | None, source: str) -> str:
    """Where the asked-for matrix is in the file; UserError when it is absent or stored by columns."""
    if use_raw and layer is not None:
        raise UserError("both adata.raw and a layer were asked for; choose one of them", {"use_raw": None, "layer": None})
    key = "raw/X" if use_raw else (f"layers/{layer}" if layer is not None else "X")
    if key not in file:
        raise UserError(f"{source} has no matrix {key}; read .X, adata.raw or a layer that it holds",
                        {"use_raw": None, "layer": None})
    stored = file[key]
    if _stored_format(stored) not in ("csr", "dense"):
        raise UserError(f"{key} of {source} is stored by columns ({_stored_format(stored)}), so its cells cannot be "
                        "read one batch at a time; save it by rows (adata.X = adata.X.tocsr(); adata.write_h5ad(...)) "
                        "or train without --backed", {"backed": None})
    if min(_stored_shape(stored)) == 0:
        raise UserError(f"{source} has no cells or no genes in {key}; check the file or read another matrix")
    dtype = stored.dtype if isinstance(stored, h5py.Dataset) else stored["data"].dtype
    if dtype.kind not in "biuf":
        raise UserError(f"{key} of {source} has non-numeric dtype {dtype}; store expression values as numbers")
    return key


def _usable_matrix(x: BackedMatrix, x_values: sp.csr_matrix, *, normalize: bool,
                   source: str) -> tuple[BackedMatrix, sp.csr_matrix]:
    """.X, or .raw where .X cannot be used and .raw can (`utils._select_matrix`'s automatic choice), with its
    `value_stand_in`."""
    problem = _log_scale_problem(x_values, normalize=normalize)
    if problem is None:
        return x, x_values
    with h5py.File(x.path, "r") as file:
        usable = "raw/X" in file and _stored_format(file["raw/X"]) in ("csr", "dense")
    if not usable:
        return x, x_values  # .X's own error follows
    raw = BackedMatrix.open(x.path, "raw/X")
    raw_values = value_stand_in(raw)
    if _log_scale_problem(raw_values, normalize=normalize) is not None:
        return x, x_values
    warnings.warn(f".X of {source} {problem}; reading adata.raw instead, as use_raw=True (--use_raw) does", stacklevel=4)
    return raw, raw_values


def value_stand_in(matrix: BackedMatrix) -> sp.csr_matrix:
    """A (cells, 2) matrix that `utils._as_log_normalized` judges as it would the whole matrix, built a chunk at a
    time: per cell, its largest value (NaN if any is not finite) and its smallest if negative, else one of its
    non-integer values. The extremes, the cells with bad values and whether all values are integers are the same."""
    parts = []
    for chunk in matrix.chunks():
        values, filled = chunk.data, np.flatnonzero(np.diff(chunk.indptr))  # cells with stored values
        if values.size == 0:
            parts.append(sp.csr_matrix((chunk.shape[0], 2), dtype=np.float32))
            continue
        starts = chunk.indptr[filled]
        bad = np.add.reduceat(~np.isfinite(values), starts) > 0
        largest = np.where(bad, np.nan, np.maximum.reduceat(values, starts))
        smallest = np.minimum.reduceat(values, starts)
        fraction = np.zeros(chunk.shape[0], np.float32)
        odd = np.flatnonzero(values != np.round(values))
        cells = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
        fraction[cells[odd]] = values[odd]  # any one of a cell's non-integer values
        second = np.where(smallest < 0, smallest, fraction[filled])
        parts.append(sp.csr_matrix((np.concatenate([largest, second]).astype(np.float32),
                                    (np.concatenate([filled, filled]), np.repeat([0, 1], filled.size))),
                                   shape=(chunk.shape[0], 2)))
    return sp.vstack(parts, format="csr", dtype=np.float32)


def align_columns(data: ExpressionData, genes: list[str]) -> ExpressionData:
    """`utils.align_genes` for data in memory or backed: a backed matrix keeps the selection to apply per chunk."""
    if not isinstance(data.matrix, BackedMatrix):
        return align_genes(data, genes)
    # align_genes multiplies the matrix by its selection: given the identity, it returns the selection itself
    identity = sp.identity(len(data.genes), dtype=np.float32, format="csr")
    aligned = align_genes(replace(data, matrix=identity), genes)
    return replace(aligned, matrix=data.matrix.with_selection(aligned.matrix))


# --------------------------------------------------------------------------------------------------------------
# What the run needs of all cells: row blocks (the fingerprint), quantile cut points, the dataset
# --------------------------------------------------------------------------------------------------------------


def row_blocks(matrix: sp.spmatrix | BackedMatrix) -> Iterator[sp.csr_matrix]:
    """Consecutive blocks of CHUNK_CELLS rows with sorted indices, of a matrix in memory or on disk."""
    if isinstance(matrix, BackedMatrix):
        yield from matrix.chunks()
        return
    matrix = sp.csr_matrix(matrix)
    matrix.sort_indices()  # in place, once: canonical form, as the fingerprint has always left it
    for start in range(0, matrix.shape[0], CHUNK_CELLS):
        yield matrix[start:start + CHUNK_CELLS]


def quantile_binning(matrix: sp.spmatrix | BackedMatrix, bin_num: int, seed: int = 0) -> Binning:
    """`binning.quantile_binning` of a matrix in memory or on disk: backed, the same sample of non-zero values is
    drawn in two passes (count them, then take those at the sampled positions) and cut as a one-row matrix."""
    if not isinstance(matrix, BackedMatrix):
        return quantile_binning_in_memory(matrix, bin_num, seed)
    total = sum(int((chunk.data > 0).sum()) for chunk in matrix.chunks())
    # positions of the values that binning.quantile_binning's rng.choice(values, ...) takes: the same draw
    chosen = (np.sort(np.random.default_rng(seed).choice(total, QUANTILE_SAMPLE, replace=False))
              if total > QUANTILE_SAMPLE else None)
    sample, seen = [], 0
    for chunk in matrix.chunks():
        values = chunk.data[chunk.data > 0]
        if chosen is not None:
            inside = chosen[(chosen >= seen) & (chosen < seen + values.size)]
            sample.append(values[inside - seen])
        else:
            sample.append(values)
        seen += values.size
    values = np.concatenate(sample) if sample else np.zeros(0, np.float32)
    return binning_of_sample(values, bin_num)


class BackedDataset(BinnedDataset):
    """`BinnedDataset` over a BackedMatrix: each batch's rows are read from the file, the rest is the same."""

    def __init__(self, matrix: BackedMatrix, binning: Binning, labels: np.ndarray | None = None):
        super().__init__(sp.csr_matrix((matrix.shape[0], 0)), binning, labels)  # checks the labels against the cells
        self.matrix = matrix


def binned_dataset(matrix: sp.spmatrix | BackedMatrix, binning: Binning, labels: np.ndarray | None = None) -> BinnedDataset:
    """The dataset of a matrix in memory (`BinnedDataset`) or on disk (`BackedDataset`): the same batches."""
    if isinstance(matrix, BackedMatrix):
        return BackedDataset(matrix, binning, labels)
    return BinnedDataset(matrix, binning, labels)
