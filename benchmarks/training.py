"""The bundled PBMC data for the data benchmarks: load it (optionally reduced), write subsets, train on them.

The benchmarks split the data themselves and write the training cells to an .h5ad file; accuracy_calibration and
pruning_tradeoff then run the user's pipeline on it (`finetune_sparse.pipeline`, benchmarks/pipeline.py), novel_type
`finetune_sparse.run`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

import finetune_sparse
from utils import (
    ExpressionData,
    load_dataset,
)


def load_pbmc(config: dict, seed: int = 0) -> ExpressionData:
    """The bundled PBMC data (log-normalized .raw, bulk_labels), optionally reduced as the config asks.

    `min_cells_per_class` drops small classes, `max_cells` keeps a stratified subsample, `genes` keeps the most
    variable genes (0 = keep all): only the smoke configuration uses them.
    """
    data = load_dataset(None)
    keep = np.ones(len(data.labels), dtype=bool)
    if config["min_cells_per_class"]:
        names, counts = np.unique(data.labels, return_counts=True)
        keep &= np.isin(data.labels, names[counts >= config["min_cells_per_class"]])
    rows = np.flatnonzero(keep)
    if config["max_cells"] and config["max_cells"] < rows.size:
        from sklearn.model_selection import train_test_split

        rows, _ = train_test_split(rows, train_size=config["max_cells"], stratify=data.labels[rows], random_state=seed)
        rows = np.sort(rows)
    matrix = data.matrix[rows]
    genes = data.genes
    if config["genes"] and config["genes"] < len(genes):
        mean = np.asarray(matrix.mean(axis=0)).ravel()
        variance = np.asarray(matrix.multiply(matrix).mean(axis=0)).ravel() - mean**2
        columns = np.sort(np.argsort(-variance, kind="stable")[: config["genes"]])
        matrix, genes = matrix[:, columns], [genes[i] for i in columns]
    return ExpressionData(sp.csr_matrix(matrix), genes, [data.cell_ids[i] for i in rows], data.labels[rows], data.adata)


def write_h5ad(data: ExpressionData, rows: np.ndarray, path: Path) -> Path:
    """The given cells as an .h5ad with log-normalized .X and labels in obs['cell_type']."""
    adata = anndata.AnnData(
        X=data.matrix[rows],
        obs=pd.DataFrame({"cell_type": data.labels[rows]}, index=[data.cell_ids[i] for i in rows]),
        var=pd.DataFrame(index=data.genes),
    )
    adata.write_h5ad(path)
    return path


def write_resampled(path: Path, data: ExpressionData, n_cells: int, noise: float, seed: int) -> dict:
    """`n_cells` cells drawn with replacement from `data`, each stored value times exp(noise · N(0, 1)) so no two
    are equal, as a csr .h5ad like `write_h5ad`'s; returns its size. The benchmarks' large inputs."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(data.labels), n_cells)
    matrix = data.matrix[rows]  # (cells, genes) csr
    matrix.data = (matrix.data * np.exp(noise * rng.standard_normal(matrix.nnz))).astype(np.float32)
    anndata.AnnData(X=matrix, obs=pd.DataFrame({"cell_type": data.labels[rows]}, index=[f"cell{i}" for i in range(n_cells)]),
                    var=pd.DataFrame(index=data.genes)).write_h5ad(path)
    return {"cells": n_cells, "genes": matrix.shape[1], "stored_values": int(matrix.nnz),
            "file_mb": path.stat().st_size / 2**20}


def run_finetune(train_path: Path, out_dir: Path, name: str, **options) -> dict:
    """`finetune_sparse.run` on the cells in `train_path` with these options (finetune_sparse.py's, by name), writing
    into out_dir/name, its console output in out_dir/finetune.log.

    Returns the run's summary plus its wall time and the path of its best checkpoint.
    """
    config = finetune_sparse.default_config(data_path=str(train_path), ckpt_dir=str(out_dir / name), model_name=name,
                                            **options)
    started = time.perf_counter()
    with open(out_dir / "finetune.log", "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
        result = finetune_sparse.run(config)
    result["seconds"] = time.perf_counter() - started
    result["checkpoint"] = str(finetune_sparse.RunFiles(out_dir / name, name).fold(0, "best.pth"))
    return result
