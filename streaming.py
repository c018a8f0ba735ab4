"""Cells predicted a chunk at a time, so memory follows the chunk size rather than the number of cells.

An .h5ad file is opened backed (anndata leaves .X and .raw.X on disk) and each chunk goes read and checked ->
aligned to the model's genes -> predicted -> summarised before the next is read; only the per-cell results of
all chunks are kept. predictions.csv and probabilities.csv grow a chunk at a time (`CsvAppender`) inside the
staging directory that replaces the output directory as a whole at the end.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from utils import ALL_CELLS, CellReader, ExpressionData, OutputError, align_genes, atomic_write

DEFAULT_CHUNK_CELLS = 10_000
DENSE_CHUNK_VALUES = 2**26  # float32 values of a chunk densified whole (256 MB): caps the chunk at many genes


def chunk_cells(n_genes: int, chunk_size: int | None = None) -> int:
    """`chunk_size`, else DEFAULT_CHUNK_CELLS or fewer where so many genes would make a dense chunk pass 256 MB
    (a dense .h5ad is read a chunk at a time as dense rows)."""
    if chunk_size is not None:
        return chunk_size
    return max(1, min(DEFAULT_CHUNK_CELLS, DENSE_CHUNK_VALUES // max(n_genes, 1)))


def chunk_rows(rows: np.ndarray, size: int) -> list[np.ndarray]:
    """`rows` (sorted cell positions) cut into runs of `size`."""
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def read_blocks(reader: CellReader, rows: np.ndarray, size: int) -> Iterator[ExpressionData]:
    """The cells `rows` of `reader`, read and checked `size` at a time (the first block must be the rows the reader
    chose its matrix by, `first_rows`)."""
    for block in chunk_rows(rows, size):
        yield reader.read(_as_slice(block))


def aligned_chunks(blocks: Iterable[ExpressionData], size: int, genes: list[str], *,
                   allow_missing: bool) -> Iterator[ExpressionData]:
    """The cells of `blocks` in chunks of at most `size` with the model's `genes` (see `utils.align_genes`).

    The first block's alignment warns about missing genes; later blocks, with the same genes, stay silent.
    """
    for index, data in enumerate(blocks):
        with warnings.catch_warnings():
            if index > 0:
                warnings.simplefilter("ignore")
            data = align_genes(data, genes, allow_missing=allow_missing)
        for start in range(0, len(data.cell_ids), size):
            yield subset(data, slice(start, start + size)) if len(data.cell_ids) > size else data


def _as_slice(rows: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive positions as a slice (read in one piece), others unchanged."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def subset(data: ExpressionData, rows: slice | np.ndarray) -> ExpressionData:
    """The cells `rows` of `data`."""
    if isinstance(rows, np.ndarray) and len(rows) == len(data.cell_ids):
        return data  # every cell, in order (rows are sorted and unique)
    cell_ids = data.cell_ids[rows] if isinstance(rows, slice) else [data.cell_ids[i] for i in rows]
    labels = data.labels[rows] if data.labels is not None else None
    return replace(data, matrix=data.matrix[rows], cell_ids=cell_ids, labels=labels)


def first_rows(rows: np.ndarray, size: int, streamed: bool) -> slice | np.ndarray:
    """The rows `aligned_chunks` reads first, by which a `CellReader` chooses its matrix (automatic .raw)."""
    return _as_slice(rows[:size]) if streamed else ALL_CELLS


class CsvAppender:
    """CSV files written a table at a time: each `append` adds a table's rows (the header with the first).

    Each file is an `atomic_write` held open for the whole run, so it appears complete or not at all, and a full
    disk is one OutputError naming it.
    """

    def __init__(self, directory: Path, names: tuple[str, ...]):
        self.directory, self.names = Path(directory), names
        self.stack = contextlib.ExitStack()
        self.handles: dict[str, object] = {}
        self.written: set[str] = set()

    def __enter__(self) -> CsvAppender:
        with self.stack:  # closes what was opened if a later open fails
            self.handles = {name: self.stack.enter_context(atomic_write(self.directory / name)) for name in self.names}
            self.stack = self.stack.pop_all()
        return self

    def append(self, tables: dict[str, pd.DataFrame]) -> None:
        for name, table in tables.items():
            handle = self.handles[name]
            try:
                table.to_csv(handle, index=False, header=name not in self.written)
                handle.flush()  # on disk chunk by chunk: a full disk shows at once, not at the end
            except OSError as error:  # named here: the files opened after this one would claim it as theirs
                raise OutputError(self.directory / name, error) from error
            self.written.add(name)

    def __exit__(self, *exc: object) -> bool | None:
        return self.stack.__exit__(*exc)
