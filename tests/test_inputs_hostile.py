"""Inputs a realistic user gets wrong (issue 32): one cell type, a cell type called Unassigned, gene names with
stray spaces or another letter case, Ctrl-C, and a backed AnnData. Each ends with one line naming the problem and
the fix, or just works."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_cli_errors import (
    BIN_NUM,
    CLASSES,
    GENES,
    N_CELLS,
    TINY,
    expect_error,
    make_adata,
    no_outputs,  # noqa: F401  (fixture)
    predict_argv,
    tiny_model,
    train_argv,
    write,
)

import finetune_sparse
import predict_updated
import utils
from checkpoints import load_checkpoint, save_checkpoint
from utils import UserError, align_genes, dataset_from_anndata, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:the checkpoint's head is deterministic")  # Stage A checkpoints

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "stageA.pth"
    save_checkpoint(path, tiny_model(), genes=GENES, classes=CLASSES, bin_num=BIN_NUM, stage="A")
    return path


# ---- 1. one cell type -------------------------------------------------------------------------------------------


def test_training_with_a_single_cell_type_is_one_line_error(tmp_path, capsys, no_outputs):  # noqa: F811
    data = write(make_adata(labels=["T cell"] * N_CELLS), tmp_path)
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(data, out), out, capsys,
                 ["only one cell type", "'T cell'", "two or more", "--label_key"])


def test_single_cell_type_left_by_min_cells_per_class_names_that_option(tmp_path, capsys, no_outputs):  # noqa: F811
    labels = ["T cell"] * (N_CELLS - 1) + ["NK"]
    data = write(make_adata(labels=labels), tmp_path)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="dropped 1 classes"):
        expect_error(finetune_sparse.main, train_argv(data, out, "--min_cells_per_class", "2"), out, capsys,
                     ["only one cell type", "'T cell'", "at least 2 cells", "--min_cells_per_class"])


# ---- 2. a cell type named like prediction's Unassigned ------------------------------------------------------------


@pytest.mark.parametrize("name", ["Unassigned", "unassigned", " Unassigned", "UNASSIGNED "])
def test_training_refuses_a_cell_type_named_unassigned(name, tmp_path, capsys, no_outputs):  # noqa: F811
    labels = [[name, "NK", "T cell"][i % 3] for i in range(N_CELLS)]
    data = write(make_adata(labels=labels), tmp_path)
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(data, out), out, capsys,
                 [repr(name), "obs['cell_type']", "clashes with 'Unassigned'", "rename it"])


def test_prediction_refuses_a_model_with_an_unassigned_class_before_inference(tmp_path, capsys, monkeypatch,
                                                                               no_outputs):  # noqa: F811
    """A checkpoint trained before the check: its class would crash the .h5ad after inference, so refuse first."""
    path = tmp_path / "old.pth"
    save_checkpoint(path, tiny_model(), genes=GENES, classes=["B cell", "NK", "unassigned"], bin_num=BIN_NUM,
                    stage="A")

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran although the model's classes are unusable")

    monkeypatch.setattr(predict_updated, "predict", no_inference)
    data = write(make_adata(), tmp_path)
    out = tmp_path / "out"
    expect_error(predict_updated.main, predict_argv(data, path, out), out, capsys,
                 ["'unassigned'", str(path), "clashes with 'Unassigned'", "retrain"])


def test_true_labels_called_unassigned_are_fine_for_prediction(model, tmp_path):
    """Only the model's classes matter: evaluation data may well call its unlabelled cells Unassigned."""
    labels = [CLASSES[i % 3] if i % 4 else "Unassigned" for i in range(N_CELLS)]
    data = write(make_adata(labels=labels), tmp_path)
    out = tmp_path / "out"
    assert predict_updated.main(predict_argv(data, model, out, "--label_key", "cell_type", "--unassign_by",
                                             "confidence")) == 0
    written = anndata.read_h5ad(out / "predictions.h5ad")
    assert (written.obs["cell_type"] == "Unassigned").sum() == N_CELLS // 4


# ---- 3. gene names: surrounding whitespace, letter case -----------------------------------------------------------


def test_gene_names_with_surrounding_whitespace_match_and_warn_once_with_the_count():
    padded = [f"{gene} " if i % 3 == 0 else gene for i, gene in enumerate(GENES)]  # a third with a trailing space
    n_padded = sum(gene != gene.strip() for gene in padded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = dataset_from_anndata(make_adata(genes=padded), label_key="cell_type")
        aligned = align_genes(data, GENES)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert f"{n_padded} gene names" in messages[0] and "'GENE0 '" in messages[0]
    clean = align_genes(dataset_from_anndata(make_adata(), label_key="cell_type"), GENES)
    assert aligned.genes == GENES
    assert (aligned.matrix != clean.matrix).nnz == 0


def test_model_gene_names_with_surrounding_whitespace_match_the_data():
    data = dataset_from_anndata(make_adata(), label_key="cell_type")
    model_genes = [f" {gene}" if i < 5 else gene for i, gene in enumerate(GENES)]
    with pytest.warns(UserWarning, match="5 of the model's gene names have surrounding whitespace") as caught:
        aligned = align_genes(data, model_genes)
    assert not any("missing" in str(w.message) for w in caught)
    assert (aligned.matrix != data.matrix).nnz == 0  # every gene found, in the same order


def test_genes_that_become_duplicates_without_whitespace_are_refused():
    genes = [*GENES[:-1], f"{GENES[0]} "]
    with pytest.raises(UserError, match="once surrounding whitespace is removed.*'GENE0'"), \
            pytest.warns(UserWarning, match="surrounding whitespace"):
        dataset_from_anndata(make_adata(genes=genes), label_key="cell_type")


def test_missing_genes_that_differ_only_in_letter_case_are_named_in_the_warning():
    genes = [gene.lower() if i % 4 == 0 else gene for i, gene in enumerate(GENES)]
    data = dataset_from_anndata(make_adata(genes=genes), label_key="cell_type")
    with pytest.warns(UserWarning, match=r"5 of 20 model genes are missing.*; 5 genes differ only in letter case "
                                         r"\(e\.g\. 'gene0' in the data vs 'GENE0' in the model\)"):
        align_genes(data, GENES)


def test_too_few_genes_because_of_letter_case_is_one_line_error_naming_it(model, tmp_path, capsys,
                                                                           no_outputs):  # noqa: F811
    data = write(make_adata(genes=[gene.lower() for gene in GENES]), tmp_path)
    out = tmp_path / "out"
    expect_error(predict_updated.main, predict_argv(data, model, out), out, capsys,
                 ["none of the 20 model genes", "20 genes differ only in letter case", "'gene0'", "'GENE0'"])


def test_letter_case_hint_ignores_genes_the_data_already_has():
    """CD3E present exactly and cd3e besides it: nothing is missing, so no hint and no warning."""
    genes = [*GENES, "gene0"]
    x = np.zeros((N_CELLS, len(genes)), dtype=np.float32)
    x[:, :len(GENES)] = make_adata().X.toarray()
    data = dataset_from_anndata(make_adata(x, genes=genes), label_key="cell_type")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align_genes(data, GENES)


# ---- 4. Ctrl-C ----------------------------------------------------------------------------------------------------


def test_run_cli_ends_a_keyboard_interrupt_with_one_line_and_status_130(capsys):
    def job():
        raise KeyboardInterrupt

    assert run_cli(job, interrupted="interrupted; rerun it") == 130
    assert capsys.readouterr().err == "interrupted; rerun it\n"
    assert run_cli(job) == 130
    assert capsys.readouterr().err.startswith("interrupted")


INTERRUPT = """
import os, signal, sys, time
import {module}

def interrupt(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
    time.sleep(30)

{module}.{function} = interrupt
sys.exit({module}.main(sys.argv[1:]))
"""


def interrupted_process(module: str, function: str, argv: list[str]) -> subprocess.CompletedProcess:
    script = INTERRUPT.format(module=module, function=function)
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not line.startswith("warning: ")]


def test_ctrl_c_during_training_is_one_line_naming_resume_and_status_130(tmp_path):
    data = write(make_adata(), tmp_path)
    result = interrupted_process("finetune_sparse", "train_epoch", train_argv(data, tmp_path / "run"))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "--resume" in lines[0], result.stderr


def test_ctrl_c_during_prediction_is_one_line_and_status_130_and_writes_nothing(model, tmp_path):
    data = write(make_adata(), tmp_path)
    out = tmp_path / "out"
    result = interrupted_process("predict_updated", "predict", predict_argv(data, model, out))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted"), result.stderr
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


# ---- 5. a backed AnnData ------------------------------------------------------------------------------------------


def backed_file(directory: Path, layout: str) -> Path:
    """The test data with X (and .raw, holding the same values) stored dense, csr or csc; some explicit zeros."""
    adata = make_adata()
    x = adata.X.toarray()
    if layout == "dense":
        adata.X = x
    else:
        matrix = sp.csr_matrix(x)
        matrix.data[::7] = 0  # stored zeros must read as they do in memory
        adata.X = matrix if layout == "csr" else sp.csc_matrix(matrix)
    adata.raw = adata.copy()
    path = directory / f"{layout}.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("use_raw", [False, True], ids=["X", "raw"])
@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_backed_anndata_reads_like_the_same_anndata_in_memory(layout, use_raw, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "BACKED_CHUNK_CELLS", 7)  # several blocks and a short last one
    path = backed_file(tmp_path, layout)
    in_memory = dataset_from_anndata(anndata.read_h5ad(path), label_key="cell_type", use_raw=use_raw)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        on_disk = dataset_from_anndata(backed, label_key="cell_type", use_raw=use_raw)
    finally:
        backed.file.close()
    assert on_disk.matrix.dtype == np.float32 and sp.isspmatrix_csr(on_disk.matrix)
    assert on_disk.matrix.shape == in_memory.matrix.shape == (N_CELLS, len(GENES))
    np.testing.assert_array_equal(on_disk.matrix.indptr, in_memory.matrix.indptr)
    np.testing.assert_array_equal(on_disk.matrix.indices, in_memory.matrix.indices)
    np.testing.assert_array_equal(on_disk.matrix.data, in_memory.matrix.data)
    assert on_disk.genes == in_memory.genes and on_disk.cell_ids == in_memory.cell_ids
    np.testing.assert_array_equal(on_disk.labels, in_memory.labels)


def test_backed_raw_counts_are_refused_like_in_memory_ones(tmp_path):
    path = write(make_adata(np.round(make_adata().X.toarray() * 40)), tmp_path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        with pytest.raises(UserError, match="raw counts"):
            dataset_from_anndata(backed, label_key="cell_type")
    finally:
        backed.file.close()


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_annotate_on_a_backed_anndata_equals_annotate_in_memory(layout, model, tmp_path):
    path = backed_file(tmp_path, layout)
    options = dict(bayes_mc_samples=2, seed=3, label_key="cell_type", device="cpu", unassign_by="confidence")
    expected = predict_updated.annotate(anndata.read_h5ad(path), model, **options)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        annotated = predict_updated.annotate(backed, model, **options)
    finally:
        backed.file.close()
    pd.testing.assert_frame_equal(annotated.predicted_labels, expected.predicted_labels)
    pd.testing.assert_frame_equal(annotated.probability_matrix, expected.probability_matrix)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_fit_on_a_backed_anndata_trains_the_same_model_as_in_memory(layout, tmp_path):
    path = backed_file(tmp_path, layout)
    options = {name.lstrip("-"): value for name, value in zip(TINY[::2], TINY[1::2])}
    options = {name: value if name == "device" else int(value) for name, value in options.items()}
    options |= dict(label_key="cell_type", seed=7)
    finetune_sparse.fit(anndata.read_h5ad(path), tmp_path / "memory", **options)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        finetune_sparse.fit(backed, tmp_path / "backed", **options)
    finally:
        backed.file.close()
    ours = load_checkpoint(tmp_path / "backed" / "finetune0_best.pth")
    expected = load_checkpoint(tmp_path / "memory" / "finetune0_best.pth")
    assert ours.metrics == expected.metrics
    for name, value in expected.model.state_dict().items():
        np.testing.assert_array_equal(ours.model.state_dict()[name].numpy(), value.numpy(), err_msg=name)
