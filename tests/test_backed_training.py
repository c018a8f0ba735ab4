"""Training from the file on disk (--backed) is training in memory: the same batches, fingerprint, cut points and
final validation predictions; bad values anywhere in the file give the same one-line error.

The file is a 160-cell, 120-gene, 4-class subset of scanpy's bundled pbmc68k_reduced; chunks are shrunk to 37
cells so that every whole-matrix pass spans several chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import backed_dataset
import binning
import finetune_sparse
from backed_dataset import BackedDataset, align_columns, backed_decision, load_backed_dataset
from run_manifest import data_fingerprint
from utils import BinnedDataset, UserError, align_genes, load_dataset

CELLS, GENES, TYPES = 160, 120, 4
TINY = ["--dim", "8", "--depth", "1", "--heads", "1", "--dim_head", "8", "--h_dim", "8", "--batch_size", "16",
        "--epoch", "1", "--device", "cpu", "--seed", "3", "--label_key", "cell_type", "--prune_target", "0"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(backed_dataset, "CHUNK_CELLS", 37)


@pytest.fixture(scope="module")
def pbmc() -> anndata.AnnData:
    """Log-normalized values (.raw of pbmc68k_reduced) of the largest types' cells, in a shuffled order."""
    import scanpy

    raw = scanpy.datasets.pbmc68k_reduced().raw.to_adata()
    types = raw.obs["bulk_labels"].astype(str).to_numpy()
    largest = pd.Series(types).value_counts().index[:TYPES]
    rng = np.random.default_rng(0)
    cells = rng.permutation(np.flatnonzero(np.isin(types, largest)))[:CELLS]
    return anndata.AnnData(X=sp.csr_matrix(raw.X[cells][:, :GENES], dtype=np.float32),
                           obs=pd.DataFrame({"cell_type": types[cells]}, index=raw.obs_names[cells]),
                           var=pd.DataFrame(index=raw.var_names[:GENES]))


def write(adata: anndata.AnnData, path: Path, layout: str = "csr") -> Path:
    adata = adata.copy()
    adata.X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": lambda x: np.asarray(x.todense())}[layout](adata.X)
    adata.write_h5ad(path)
    return path


def counts(adata: anndata.AnnData) -> anndata.AnnData:
    """Raw-count-like integers of the same cells (what --normalize turns into log values)."""
    x = adata.X.copy()
    x.data = np.round(np.expm1(x.data) * 3).astype(np.float32)
    return anndata.AnnData(X=x, obs=adata.obs.copy(), var=adata.var.copy())


def both_ways(path: Path, **options):
    return load_dataset(path, label_key="cell_type", **options), load_backed_dataset(path, label_key="cell_type", **options)


@pytest.mark.parametrize("layout, normalize", [("csr", False), ("dense", False), ("csr", True)])
def test_backed_batches_equal_in_memory_batches(pbmc, tmp_path, layout, normalize):
    source = counts(pbmc) if normalize else pbmc
    memory, backed = both_ways(write(source, tmp_path / "data.h5ad", layout), normalize=normalize, any_scale=True)
    assert backed.genes == memory.genes and backed.cell_ids == memory.cell_ids
    assert (backed.labels == memory.labels).all()
    bins = backed_dataset.quantile_binning(backed.matrix, 12, seed=5)
    assert bins == binning.quantile_binning(memory.matrix, 12, seed=5)
    labels = np.arange(CELLS)
    in_memory, on_disk = BinnedDataset(memory.matrix, bins, labels), BackedDataset(backed.matrix, bins, labels)
    batch = np.random.default_rng(1).choice(CELLS, 50)  # unsorted, with repeats, as a shuffled sampler's
    expected, got = in_memory.__getitems__(batch), on_disk.__getitems__(batch)
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.labels, expected.labels)
    assert len(on_disk) == len(in_memory)


def test_aligned_genes_give_the_same_tokens(pbmc, tmp_path):
    memory, backed = both_ways(write(pbmc, tmp_path / "data.h5ad"))
    model_genes = ["NOT_A_GENE", *reversed(memory.genes[:100])]  # another order, one gene missing, 20 extra dropped
    with pytest.warns(UserWarning, match="1 of 101 model genes are missing"):
        memory = align_genes(memory, model_genes)
    with pytest.warns(UserWarning, match="1 of 101 model genes are missing"):
        backed = align_columns(backed, model_genes)
    assert backed.matrix.shape == memory.matrix.shape
    bins = binning.Binning(7, 0.5)
    cells = np.arange(CELLS)
    assert torch.equal(BackedDataset(backed.matrix, bins).tokens(cells), BinnedDataset(memory.matrix, bins).tokens(cells))


@pytest.mark.parametrize("normalize", [False, True])
def test_the_fingerprint_is_the_same_backed_and_in_memory(pbmc, tmp_path, normalize):
    memory, backed = both_ways(write(counts(pbmc) if normalize else pbmc, tmp_path / "data.h5ad"), normalize=normalize)
    assert (data_fingerprint(backed.matrix, backed.cell_ids, backed.genes, backed.labels)
            == data_fingerprint(memory.matrix, memory.cell_ids, memory.genes, memory.labels))


def test_sampled_quantile_cut_points_are_the_same_backed(pbmc, tmp_path, monkeypatch):
    monkeypatch.setattr(binning, "QUANTILE_SAMPLE", 500)  # far fewer than the non-zero values: both sample
    monkeypatch.setattr(backed_dataset, "QUANTILE_SAMPLE", 500)
    memory, backed = both_ways(write(pbmc, tmp_path / "data.h5ad"))
    assert backed_dataset.quantile_binning(backed.matrix, 28, seed=9) == binning.quantile_binning(memory.matrix, 28, seed=9)


def test_small_classes_are_dropped_from_the_backed_cells(pbmc, tmp_path):
    smallest = pbmc.obs["cell_type"].value_counts().min()
    with pytest.warns(UserWarning, match="dropped 1 classes"):
        memory, backed = both_ways(write(pbmc, tmp_path / "data.h5ad"), min_cells_per_class=smallest + 1)
    assert backed.cell_ids == memory.cell_ids and backed.matrix.shape == memory.matrix.shape
    bins = binning.Binning(7, 0.5)
    cells = np.arange(memory.matrix.shape[0])
    assert torch.equal(BackedDataset(backed.matrix, bins).tokens(cells), BinnedDataset(memory.matrix, bins).tokens(cells))


def test_a_backed_run_predicts_as_the_in_memory_run(pbmc, tmp_path, monkeypatch):
    data = write(pbmc, tmp_path / "data.h5ad")
    tuned = []  # only the backed run fixes malloc's mmap threshold (a process-wide setting: recorded, not applied)
    monkeypatch.setattr(finetune_sparse.allocator, "map_large_blocks", lambda: tuned.append(name))
    for name, extra in {"memory": [], "backed": ["--backed"]}.items():
        argv = [*TINY, "--data_path", str(data), "--ckpt_dir", str(tmp_path / name), "--model_name", "run", *extra]
        assert finetune_sparse.main(argv) == 0
    assert tuned == ["backed"]
    memory, backed = (pd.read_csv(tmp_path / name / "run0_val_predictions.csv") for name in ("memory", "backed"))
    pd.testing.assert_frame_equal(backed, memory)
    configs = [json.loads((tmp_path / name / "run_config.json").read_text()) for name in ("memory", "backed")]
    assert configs[0]["data_fingerprint"] == configs[1]["data_fingerprint"]
    assert "read from disk batch by batch: --backed" in (tmp_path / "backed" / "run.log").read_text()
    # fit() reads a backed AnnData's file backed too
    finetune_sparse.fit(anndata.read_h5ad(data, backed="r"), tmp_path / "fit", backed=True, model_name="run",
                        dim=8, depth=1, heads=1, dim_head=8, h_dim=8, batch_size=16, epoch=1, device="cpu", seed=3,
                        label_key="cell_type", prune_target=0.0)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "fit" / "run0_val_predictions.csv"), memory)
    # the same data either way: resuming the in-memory run backed is accepted
    argv = [*TINY, "--data_path", str(data), "--ckpt_dir", str(tmp_path / "memory"), "--model_name", "run", "--resume",
            "--backed"]
    assert finetune_sparse.main(argv) == 0


@pytest.mark.parametrize("value, keywords", [(np.nan, ["1 of 160 cells", "NaN"]), (-2.0, ["negative values", "-2"])])
def test_a_bad_value_in_the_last_chunk_is_a_one_line_error(pbmc, tmp_path, capsys, value, keywords):
    bad = pbmc.copy()
    bad.X[CELLS - 1, bad.X[CELLS - 1].indices[0]] = value
    data = write(bad, tmp_path / "bad.h5ad")
    argv = [*TINY, "--data_path", str(data), "--ckpt_dir", str(tmp_path / "run"), "--backed"]
    capsys.readouterr()
    assert finetune_sparse.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(keyword in lines[0] for keyword in keywords), lines[0]
    assert not (tmp_path / "run").exists()


def test_raw_counts_are_refused_backed_as_in_memory(pbmc, tmp_path):
    path = write(counts(pbmc), tmp_path / "counts.h5ad")
    with pytest.raises(UserError) as in_memory:
        load_dataset(path, label_key="cell_type")
    with pytest.raises(UserError) as backed:
        load_backed_dataset(path, label_key="cell_type")
    assert str(backed.value) == str(in_memory.value)


def test_a_column_compressed_file_is_refused_backed(pbmc, tmp_path):
    with pytest.raises(UserError, match="stored by columns"):
        load_backed_dataset(write(pbmc, tmp_path / "csc.h5ad", "csc"), label_key="cell_type")


def test_backed_is_automatic_when_the_matrix_would_not_fit(pbmc, tmp_path, monkeypatch):
    path = write(pbmc, tmp_path / "data.h5ad")
    assert backed_decision(path, asked=False)[0] is False  # a few hundred kB
    monkeypatch.setattr(backed_dataset, "available_memory", lambda: 1000)
    backed, reason = backed_decision(path, asked=False)
    assert backed and "GiB available" in reason
    with pytest.raises(UserError, match="data_path"):
        backed_decision(None, asked=True)


def test_scaled_x_falls_back_to_raw_as_in_memory(pbmc, tmp_path):
    scaled = pbmc.copy()
    scaled.raw = pbmc.copy()
    dense = scaled.X.toarray()
    scaled.X = sp.csr_matrix((dense - dense.mean(0)) / (dense.std(0) + 1))  # negative values: scaled data
    path = write(scaled, tmp_path / "scaled.h5ad")
    with pytest.warns(UserWarning, match="reading adata.raw instead"):
        memory = load_dataset(path, label_key="cell_type")
    with pytest.warns(UserWarning, match="reading adata.raw instead"):
        backed = load_backed_dataset(path, label_key="cell_type")
    assert backed.matrix.key == "raw/X" and backed.genes == memory.genes
    bins = binning.Binning(7, 0.5)
    cells = np.arange(CELLS)
    assert torch.equal(BackedDataset(backed.matrix, bins).tokens(cells), BinnedDataset(memory.matrix, bins).tokens(cells))
