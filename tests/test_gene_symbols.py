"""--gene_symbols COLUMN: both CLIs name genes by an adata.var column (10x/CELLxGENE files keep Ensembl IDs as
var_names and symbols in a column), and matching by the wrong names says which column to use."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_cli_errors import tiny_model  # the same 20 genes (GENE0..GENE19) and 3 classes

import finetune_sparse
import predict_updated
from checkpoints import load_checkpoint, save_checkpoint
from utils import UserError, align_genes, dataset_from_anndata

pytestmark = pytest.mark.filterwarnings("ignore:the checkpoint's head is deterministic")  # Stage A checkpoints

SYMBOLS = [f"GENE{i}" for i in range(20)]
ENSEMBL = [f"ENSG{i:011d}" for i in range(20)]
CLASSES = ["B cell", "NK", "T cell"]
N_CELLS = 48
BIN_NUM = 5
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--h_dim", "16", "--epoch", "1",
        "--batch_size", "16", "--grad_acc", "1", "--device", "cpu"]


def make_adata(var_names: list[str] = ENSEMBL, symbols: list | None = SYMBOLS) -> anndata.AnnData:
    """Log-normalized-looking values in [0, 4), three balanced classes; symbols in var['feature_name']."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random((N_CELLS, len(var_names))) < 0.5, 0, rng.uniform(0, 4, (N_CELLS, len(var_names))))
    obs = pd.DataFrame({"cell_type": [CLASSES[i % 3] for i in range(N_CELLS)]},
                       index=[f"cell{i}" for i in range(N_CELLS)])
    var = pd.DataFrame({"n_cells": np.arange(len(var_names))}, index=var_names)  # a numeric column is never a hint
    if symbols is not None:
        var["feature_name"] = symbols
    return anndata.AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same cells with Ensembl var_names (+ symbol column) and with symbols as var_names; a symbol model."""
    root = tmp_path_factory.mktemp("symbols")
    make_adata().write_h5ad(root / "ensembl.h5ad")
    make_adata(var_names=SYMBOLS, symbols=None).write_h5ad(root / "symbols.h5ad")
    save_checkpoint(root / "model.pth", tiny_model(), genes=SYMBOLS, classes=CLASSES, bin_num=BIN_NUM, stage="A")
    return {"ensembl": root / "ensembl.h5ad", "symbols": root / "symbols.h5ad", "model": root / "model.pth"}


def predict_argv(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--model_path", str(model), "--output_dir", str(out), "--device", "cpu",
            "--bayes_mc_samples", "2", *extra]


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---- the data layer -------------------------------------------------------------------------------------------


def test_gene_symbols_names_genes_by_the_column_and_keeps_the_matrix():
    adata = make_adata()
    by_id = dataset_from_anndata(adata)
    by_symbol = dataset_from_anndata(adata, gene_symbols="feature_name")
    assert by_id.genes == ENSEMBL and by_symbol.genes == SYMBOLS
    assert (by_id.matrix != by_symbol.matrix).nnz == 0


def test_gene_symbols_with_use_raw_reads_the_raw_var():
    adata = make_adata()
    adata.raw = adata.copy()  # raw keeps var's columns, so the same option works with --use_raw
    del adata.var["feature_name"]
    assert dataset_from_anndata(adata, use_raw=True, gene_symbols="feature_name").genes == SYMBOLS


def test_missing_symbol_column_names_the_available_columns():
    with pytest.raises(UserError, match=r"'symbol' not found in adata.var.*'n_cells', 'feature_name'") as error:
        dataset_from_anndata(make_adata(), gene_symbols="symbol")
    assert error.value.options == {"gene_symbols": None}


def test_duplicated_symbols_are_refused_like_duplicated_gene_names():
    symbols = [*SYMBOLS[:-1], "GENE0"]  # 10x features often share a symbol
    with pytest.raises(UserError, match=r"1 gene names occur more than once.*feature_name.*'GENE0'.*make them unique"):
        dataset_from_anndata(make_adata(symbols=symbols), gene_symbols="feature_name")


def test_missing_symbols_are_refused():
    symbols: list = [*SYMBOLS[:-2], None, ""]
    with pytest.raises(UserError, match=r"2 of 20 genes have no name.*'feature_name'"):
        dataset_from_anndata(make_adata(symbols=symbols), gene_symbols="feature_name")


def test_few_matching_var_names_point_to_the_column_holding_the_model_genes():
    """6 of 20 symbols as var_names (under the 50% overlap), all 20 in the column: the error names the column."""
    data = dataset_from_anndata(make_adata(var_names=[*SYMBOLS[:6], *ENSEMBL[6:]]))
    with pytest.raises(UserError, match=r"only 6 of 20 model genes.*var column 'feature_name' holds 20 of them: "
                                        r"name genes by it") as error:
        align_genes(data, SYMBOLS)
    assert error.value.options == {"allow_missing_genes": True, "gene_symbols": "feature_name"}


def test_no_hint_when_no_column_holds_more_model_genes():
    data = dataset_from_anndata(make_adata(symbols=[f"other{i}" for i in range(20)]))
    with pytest.raises(UserError, match="none of the 20 model genes") as caught:
        align_genes(data, SYMBOLS)
    assert "--gene_symbols" not in str(caught.value)


# ---- the CLIs -------------------------------------------------------------------------------------------------


def test_prediction_by_symbol_column_equals_prediction_by_symbol_var_names(files, tmp_path):
    by_column = tmp_path / "by_column"
    by_names = tmp_path / "by_names"
    argv = predict_argv(files["ensembl"], files["model"], by_column, "--gene_symbols", "feature_name")
    assert predict_updated.main(argv) == 0
    assert predict_updated.main(predict_argv(files["symbols"], files["model"], by_names)) == 0
    for name in ("predictions.csv", "probabilities.csv"):
        assert (by_column / name).read_bytes() == (by_names / name).read_bytes()
    # The written AnnData is the user's, var_names (Ensembl IDs) and all.
    assert anndata.read_h5ad(by_column / "predictions.h5ad").var_names.tolist() == ENSEMBL


def test_prediction_without_gene_symbols_suggests_the_column(files, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert predict_updated.main(predict_argv(files["ensembl"], files["model"], out)) == 2
    line = one_line_error(capsys)
    assert "none of the 20 model genes" in line and "(command line: --gene_symbols feature_name)" in line
    assert not out.exists()


def test_prediction_with_a_missing_column_is_one_line_error(files, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    argv = predict_argv(files["ensembl"], files["model"], out, "--gene_symbols", "gene_symbols")
    assert predict_updated.main(argv) == 2
    line = one_line_error(capsys)
    assert "'gene_symbols' not found" in line and "'feature_name'" in line
    assert not out.exists()


def test_training_by_symbol_column_makes_symbols_the_model_genes(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--data_path", str(files["ensembl"]), "--ckpt_dir", str(out), "--model_name", "run",
            "--gene_symbols", "feature_name"]
    assert finetune_sparse.main(argv) == 0
    assert load_checkpoint(out / "run0_best.pth").genes == SYMBOLS
    # Symbols as var_names now match the trained model directly; the Ensembl file needs the option again.
    assert predict_updated.main(predict_argv(files["symbols"], out / "run0_best.pth", tmp_path / "a")) == 0
    capsys.readouterr()
    assert predict_updated.main(predict_argv(files["ensembl"], out / "run0_best.pth", tmp_path / "b")) == 2
    assert "--gene_symbols feature_name" in one_line_error(capsys)


def test_training_with_a_missing_column_is_one_line_error(files, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    argv = [*TINY, "--data_path", str(files["ensembl"]), "--ckpt_dir", str(out), "--model_name", "run",
            "--gene_symbols", "symbol"]
    assert finetune_sparse.main(argv) == 2
    assert "'symbol' not found in adata.var" in one_line_error(capsys)
    assert not out.exists() or not any(out.iterdir())
