"""Bad inputs to finetune_sparse.py and predict_updated.py: one line `error: ...` that names the problem and the fix,
exit status 2, no traceback, found before training starts or any output is written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import finetune_sparse
import predict_updated
from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig
from checkpoints import save_checkpoint
from performer_pytorch import PerformerConfig
from utils import UserError, run_cli

pytestmark = [
    pytest.mark.filterwarnings("ignore:Variable names are not unique"),  # the duplicated-genes input, on purpose
    pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning"),  # the HDF5-but-not-AnnData input
    pytest.mark.filterwarnings("ignore:the checkpoint's head is deterministic"),  # predicting with a Stage A model
]

ROOT = Path(__file__).resolve().parent.parent
GENES = [f"GENE{i}" for i in range(20)]
CLASSES = ["B cell", "NK", "T cell"]
N_CELLS = 48
BIN_NUM = 5
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--h_dim", "16", "--epoch", "1",
        "--batch_size", "16", "--grad_acc", "1", "--device", "cpu"]


# ---- inputs ---------------------------------------------------------------------------------------------------


def make_adata(x: np.ndarray | None = None, *, labels: list | None = None, genes: list[str] | None = None,
               label_key: str = "cell_type") -> anndata.AnnData:
    """Log-normalized-looking values in [0, 4) (tokens stay below BIN_NUM), three balanced classes."""
    rng = np.random.default_rng(0)
    if x is None:
        x = np.where(rng.random((N_CELLS, len(GENES))) < 0.5, 0, rng.uniform(0, 4, (N_CELLS, len(GENES))))
    labels = [CLASSES[i % 3] for i in range(x.shape[0])] if labels is None else labels
    obs = pd.DataFrame({label_key: labels}, index=[f"cell{i}" for i in range(x.shape[0])])
    var = pd.DataFrame(index=GENES[: x.shape[1]] if genes is None else genes)
    return anndata.AnnData(X=sp.csr_matrix(np.asarray(x, dtype=np.float32)), obs=obs, var=var)


def tiny_model(dim: int = 16, n_genes: int = len(GENES), n_classes: int = len(CLASSES)) -> BayesianSparseTransformer:
    torch.manual_seed(0)
    seq_len = n_genes + 1
    encoder = PerformerConfig(num_tokens=BIN_NUM + 2, max_seq_len=seq_len, dim=dim, depth=1, heads=2, dim_head=8,
                              nb_features=16)
    head = HeadConfig(seq_len=seq_len, dim=dim, num_classes=n_classes, hidden1=16, hidden2=16)
    return BayesianSparseTransformer(ModelConfig(encoder, head)).eval()


def scbert_style_checkpoint(path: Path, dim: int) -> None:
    """What scBERT's pretraining saves (`{'model_state_dict': PerformerLM keys}`), here for a model of width `dim`."""
    state: dict[str, torch.Tensor] = {}
    for key, value in tiny_model(dim).encoder.state_dict().items():
        parts = key.split(".")
        if key == "gene_emb.weight":
            state["pos_emb.emb.weight"] = value
        elif key == "calls_since_redraw":
            state["performer.proj_updater.calls_since_last_redraw"] = value
        elif parts[0] == "layers":
            block, kind, rest = parts[1], parts[2], ".".join(parts[3:])
            prefix = f"performer.net.layers.{block}"
            if kind in ("attn_norm", "ff_norm"):
                state[f"{prefix}.{0 if kind == 'attn_norm' else 1}.norm.{rest}"] = value
            elif kind == "ff":
                state[f"{prefix}.1.fn.fn.{rest}"] = value
            elif rest.startswith("to_qkv."):
                for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                    state[f"{prefix}.0.fn.{name}.{rest.split('.', 1)[1]}"] = chunk.clone()
            else:
                state[f"{prefix}.0.fn.{rest}"] = value
        elif key != "num_redraws":
            state[key] = value
    torch.save({"model_state_dict": state}, path)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A valid labelled data set and a Stage A checkpoint trained (not really) on its genes and classes."""
    root = tmp_path_factory.mktemp("good")
    make_adata().write_h5ad(root / "data.h5ad")
    save_checkpoint(root / "stageA.pth", tiny_model(), genes=GENES, classes=CLASSES, bin_num=BIN_NUM, stage="A")
    return {"data": root / "data.h5ad", "model": root / "stageA.pth"}


def write(adata: anndata.AnnData, directory: Path) -> Path:
    path = directory / "data.h5ad"
    adata.write_h5ad(path)
    return path


def with_values(transform: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    return lambda d: write(make_adata(transform(make_adata().X.toarray())), d)


def nan_and_inf(x: np.ndarray) -> np.ndarray:
    x[3, 1], x[7, 2], x[9, 0] = np.nan, np.nan, np.inf
    return x


def labels_with_gaps(d: Path) -> Path:
    labels: list = [CLASSES[i % 3] for i in range(N_CELLS)]
    labels[4] = labels[11] = None
    return write(make_adata(labels=labels), d)


def duplicated_genes(d: Path) -> Path:
    return write(make_adata(genes=[*GENES[:-1], GENES[0]]), d)


def truncated_h5ad(d: Path) -> Path:
    path = write(make_adata(), d)
    path.write_bytes(path.read_bytes()[:1500])
    return path


def hdf5_not_anndata(d: Path) -> Path:
    path = d / "data.h5ad"
    with h5py.File(path, "w") as handle:
        handle["counts"] = np.ones((3, 3))
    return path


def text_named_h5ad(d: Path) -> Path:
    path = d / "data.h5ad"
    path.write_text("gene,cell1\nCD3E,4\n", encoding="utf-8")
    return path


def directory(d: Path) -> Path:
    path = d / "data.h5ad"
    path.mkdir()
    return path


# Bad data for both CLIs: (writer(dir) -> path, keywords every message must contain)
BAD_DATA = {
    "missing file": (lambda d: d / "missing.h5ad", ["not found", "missing.h5ad"]),
    "text file named .h5ad": (text_named_h5ad, ["cannot read", "anndata", "write_h5ad"]),
    "hdf5 but not anndata": (hdf5_not_anndata, ["cannot read", "anndata"]),
    "truncated h5ad": (truncated_h5ad, ["cannot read", "anndata"]),
    "directory": (directory, ["is a directory", ".h5ad file"]),
    "zero cells": (lambda d: write(make_adata(np.zeros((0, len(GENES)))), d), ["no cells"]),
    "zero genes": (lambda d: write(make_adata(np.zeros((N_CELLS, 0))), d), ["no genes"]),
    "negative (scaled) values": (with_values(lambda x: x - 1), ["negative", "scaled", "--use_raw", "--layer"]),
    "raw counts": (with_values(lambda x: np.round(x * 40)), ["raw counts", "--normalize"]),
    "nan and inf": (with_values(nan_and_inf), ["3 of 48 cells", "nan", "infinite"]),
    "duplicated gene names": (duplicated_genes, ["more than once", "'GENE0'", "var_names_make_unique"]),
}
# Bad labels, for training and for prediction with --label_key.
BAD_LABELS = {
    "label column missing": (
        lambda d: write(make_adata(label_key="celltype"), d),
        ["'cell_type' not found", "available obs columns", "'celltype'", "--label_key"],
    ),
    "labels with missing values": (labels_with_gaps, ["2 of 48 cells have no label", "cell_type"]),
}


# ---- how a failure must look ------------------------------------------------------------------------------------


def snapshot(path: Path) -> dict[str, str] | None:
    """Hashes of `path` or of every file under it, None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()}


def assert_one_line_error(stderr: str, keywords: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr
    for keyword in keywords:
        assert keyword.lower() in lines[0].lower(), f"{keyword!r} not in: {lines[0]}"


@pytest.fixture
def no_outputs(monkeypatch):
    """Fail loudly if a CLI gets as far as creating its outputs (and, for training, as far as training)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("outputs were created although an input is bad")

    monkeypatch.setattr(finetune_sparse, "create_outputs", forbidden)
    monkeypatch.setattr(predict_updated, "write_outputs", forbidden)


def expect_error(main: Callable[[list[str]], int], argv: list[str], out: Path, capsys, keywords: list[str]) -> None:
    before = snapshot(out)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert_one_line_error(captured.err, keywords)
    assert snapshot(out) == before, f"{out} changed"


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data_path", str(data), "--ckpt_dir", str(out), "--model_name", "run", *extra]


def predict_argv(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--model_path", str(model), "--output_dir", str(out), "--device", "cpu",
            "--bayes_mc_samples", "2", *extra]


# ---- bad data ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [*BAD_DATA, *BAD_LABELS])
def test_bad_training_data_is_one_line_error(case, tmp_path, capsys, no_outputs):
    writer, keywords = {**BAD_DATA, **BAD_LABELS}[case]
    data = writer(tmp_path)
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(data, out), out, capsys, keywords)


@pytest.mark.parametrize("case", [*BAD_DATA, *BAD_LABELS])
def test_bad_prediction_data_is_one_line_error(case, good, tmp_path, capsys, no_outputs):
    writer, keywords = {**BAD_DATA, **BAD_LABELS}[case]
    data = writer(tmp_path)
    out = tmp_path / "predictions"
    labels = ["--label_key", "cell_type"] if case in BAD_LABELS else []
    expect_error(predict_updated.main, predict_argv(data, good["model"], out, *labels), out, capsys, keywords)


def test_unlabelled_prediction_ignores_a_missing_label_column(good, tmp_path):
    """Without --label_key, prediction does not need labels at all."""
    data = write(make_adata(label_key="celltype"), tmp_path)
    assert predict_updated.main(predict_argv(data, good["model"], tmp_path / "out")) == 0


def test_raw_counts_work_with_normalize(good, tmp_path):
    data = with_values(lambda x: np.round(x * 40))(tmp_path)
    out = tmp_path / "out"
    assert predict_updated.main(predict_argv(data, good["model"], out, "--normalize")) == 0
    assert (out / "predictions.csv").exists()


def test_class_too_small_to_split_names_it_and_min_cells_per_class_fixes_it(tmp_path, capsys, no_outputs, monkeypatch):
    labels = [CLASSES[i % 3] for i in range(N_CELLS)]
    labels[5] = "platelet"  # a single cell cannot be in both the training and the validation split
    data = write(make_adata(labels=labels), tmp_path)
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(data, out), out, capsys, ["'platelet'", "--min_cells_per_class"])

    monkeypatch.undo()  # allow outputs again
    with pytest.warns(UserWarning, match="dropped 1 classes.*'platelet'"):
        assert finetune_sparse.main(train_argv(data, out, "--min_cells_per_class", "2")) == 0
    assert (out / "run0_best.pth").exists()
    kept = (out / "run0_val_cells.txt").read_text(encoding="utf-8").split()
    assert "cell5" not in kept


def test_too_few_cells_for_a_validation_cell_per_class_is_one_line_error(tmp_path, capsys, no_outputs):
    """6 cells of 3 classes: a 20% validation split has 2 cells, fewer than the 3 classes it must hold."""
    data = write(make_adata(make_adata().X.toarray()[:6]), tmp_path)
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(data, out), out, capsys,
                 ["cannot split 6 cells of 3 classes", "--min_cells_per_class"])


def test_no_shared_genes_with_the_checkpoint_is_one_line_error(good, tmp_path, capsys, no_outputs):
    data = write(make_adata(genes=[f"ENSG{i:011d}" for i in range(len(GENES))]), tmp_path)
    keywords = ["none of the 20 model genes", "gene naming"]
    out = tmp_path / "predictions"
    expect_error(predict_updated.main, predict_argv(data, good["model"], out), out, capsys, keywords)
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(data, out, "--model_path", str(good["model"])), out, capsys,
                 keywords)


# ---- bad checkpoints --------------------------------------------------------------------------------------------


def tampered(good: dict, directory: Path, change: Callable[[dict], None]) -> Path:
    """Our checkpoint with `change` applied to its payload (as someone else's edited file would be)."""
    payload = torch.load(good["model"], weights_only=True)
    change(payload)
    path = directory / "tampered.pth"
    torch.save(payload, path)
    return path


def truncated_checkpoint(good: dict, directory: Path) -> Path:
    path = directory / "truncated.pth"
    content = good["model"].read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def text_checkpoint(good: dict, directory: Path) -> Path:
    path = directory / "model.pth"
    path.write_text("these are not weights\n", encoding="utf-8")
    return path


def foreign_dict(good: dict, directory: Path) -> Path:
    path = directory / "other.pth"
    torch.save({"weights": torch.zeros(3), "epoch": 4}, path)
    return path


def other_width(payload: dict) -> None:
    payload["model_config"]["encoder"]["dim"] = 32
    payload["model_config"]["head"]["dim"] = 32


def unknown_config_field(payload: dict) -> None:
    payload["model_config"]["head"]["hidden3"] = 64


# Bad --model_path for both CLIs: (writer(good, dir) -> path, keywords)
BAD_CHECKPOINTS = {
    "missing": (lambda good, d: d / "nowhere.pth", ["checkpoint not found", "--model_path"]),
    "truncated": (truncated_checkpoint, ["not a readable pytorch checkpoint", "truncated"]),
    "text file": (text_checkpoint, ["not a readable pytorch checkpoint"]),
    "model_config of another width": (lambda g, d: tampered(g, d, other_width), ["another architecture"]),
    "model_config with an unknown field": (lambda g, d: tampered(g, d, unknown_config_field), ["another architecture"]),
    "model_config not a dict": (
        lambda g, d: tampered(g, d, lambda p: p.__setitem__("model_config", "dim=16")), ["another architecture"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_for_prediction_is_one_line_error(case, good, tmp_path, capsys, no_outputs):
    writer, keywords = BAD_CHECKPOINTS[case]
    out = tmp_path / "predictions"
    expect_error(predict_updated.main, predict_argv(good["data"], writer(good, tmp_path), out), out, capsys,
                 keywords)


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_for_training_is_one_line_error(case, good, tmp_path, capsys, no_outputs):
    writer, keywords = BAD_CHECKPOINTS[case]
    out = tmp_path / "run"
    argv = train_argv(good["data"], out, "--model_path", str(writer(good, tmp_path)))
    expect_error(finetune_sparse.main, argv, out, capsys, keywords)


def test_scbert_encoder_of_another_width_is_refused_before_training(good, tmp_path, capsys, no_outputs):
    path = tmp_path / "panglao_pretrain.pth"
    scbert_style_checkpoint(path, dim=32)
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(good["data"], out, "--model_path", str(path)), out, capsys,
                 ["another architecture", "(7, 32)", "--dim"])


def test_scbert_checkpoint_given_to_prediction_points_to_finetuning(good, tmp_path, capsys, no_outputs):
    path = tmp_path / "panglao_pretrain.pth"
    scbert_style_checkpoint(path, dim=16)
    out = tmp_path / "predictions"
    expect_error(predict_updated.main, predict_argv(good["data"], path, out), out, capsys,
                 ["not a checkpoint of this project", "scbert", "finetune_sparse.py"])


def test_foreign_dictionary_is_one_line_error(good, tmp_path, capsys, no_outputs):
    path = foreign_dict(good, tmp_path)
    out = tmp_path / "predictions"
    expect_error(predict_updated.main, predict_argv(good["data"], path, out), out, capsys,
                 ["not a checkpoint of this project"])
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(good["data"], out, "--model_path", str(path)), out, capsys,
                 ["neither a checkpoint of this project nor a scbert"])


# A checkpoint whose metadata disagrees with its own model: the file loads, the model is built, and only the
# forward pass (or the label lookup) finds out.
INCONSISTENT = {
    "fewer gene names than model inputs": lambda p: p.__setitem__("genes", p["genes"][:10]),
    "fewer class names than model outputs": lambda p: p.__setitem__("classes", p["classes"][:2]),
    "bin_num beyond the token vocabulary": lambda p: p.__setitem__("bin_num", 9),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_checkpoint_metadata_inconsistent_with_its_model_is_one_line_error(case, good, tmp_path, capsys):
    path = tampered(good, tmp_path, INCONSISTENT[case])
    # Values up to 9.9 give tokens up to 9, beyond the 7-token vocabulary the model was built with.
    data = with_values(lambda x: np.where(x > 0, x * 2.5, 0))(tmp_path)
    out = tmp_path / "predictions"
    expect_error(predict_updated.main, predict_argv(data, path, out), out, capsys, ["checkpoint"])


def test_training_from_checkpoint_with_fewer_gene_names_than_inputs_is_one_line_error(good, tmp_path, capsys):
    path = tampered(good, tmp_path, INCONSISTENT["fewer gene names than model inputs"])
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, train_argv(good["data"], out, "--model_path", str(path)), out, capsys,
                 ["checkpoint"])


def test_training_from_checkpoint_with_other_bin_num_errors_or_uses_the_checkpoints(good, tmp_path, capsys):
    data = with_values(lambda x: np.where(x > 0, x * 2.5, 0))(tmp_path)  # log values up to ~10
    out = tmp_path / "run"
    code = finetune_sparse.main(train_argv(data, out, "--model_path", str(good["model"]), "--bin_num", "9"))
    if code == 2:  # refused: the message must point at the flag
        assert_one_line_error(capsys.readouterr().err, ["--bin_num"])
        assert not out.exists()
    else:  # or adopted the checkpoint's binning, as it adopts its architecture
        assert code == 0
        assert torch.load(out / "run0_best.pth", weights_only=True)["bin_num"] == BIN_NUM


# ---- option values out of range -----------------------------------------------------------------------------------


BAD_TRAINING_OPTIONS = [
    (["--prune_target", "1.0"], ["--prune_target", "[0, 1)"]),
    (["--prune_target", "-0.1"], ["--prune_target", "[0, 1)"]),
    (["--prune_step", "0"], ["--prune_step", "positive"]),
    (["--prune_distill", "1.5"], ["--prune_distill", "[0, 1]"]),
    (["--prune_refit_ridge", "0"], ["--prune_refit_ridge", "positive"]),
    (["--prune_refit_cells", "0"], ["--prune_refit_cells", "at least 1"]),
    (["--group_lasso", "-1"], ["--group_lasso", "at least 0"]),
    (["--bin_num", "0"], ["--bin_num", "at least 1"]),
    (["--batch_size", "0"], ["--batch_size", "at least 1"]),
    (["--grad_acc", "0"], ["--grad_acc", "at least 1"]),
    (["--prune_layers", "fc9"], ["--prune_layers", "fc9", "fc1,fc2"]),
    (["--prune_layers", "fc1,fc3"], ["--prune_layers", "fc3", "fc1,fc2"]),
    (["--mc_samples_eval", "0"], ["--mc_samples_eval", "at least 1"]),
    (["--mc_samples", "0"], ["--mc_samples", "at least 1"]),
    (["--cv_splits", "0"], ["--cv_splits", "at least 1"]),
    (["--novelty_input_pcs", "0"], ["--novelty_input_pcs", "at least 1"]),
    (["--learning_rate", "0"], ["--learning_rate", "positive"]),
    (["--dropout", "1"], ["--dropout", "[0, 1)"]),
    (["--min_cells_per_class", "-1"], ["--min_cells_per_class", "at least 0"]),
    (["--gene_num", "21"], ["--gene_num 21", "20 genes"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--device", "gpu0"], ["--device", "not a device name", "cpu"]),
    pytest.param(["--device", "cuda"], ["--device", "no gpu", "--device cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")),
]


@pytest.mark.parametrize(("options", "keywords"), BAD_TRAINING_OPTIONS, ids=lambda v: " ".join(v))
def test_training_option_out_of_range_is_one_line_error(options, keywords, good, tmp_path, capsys, no_outputs):
    out = tmp_path / "run"
    expect_error(finetune_sparse.main, [*train_argv(good["data"], out), *options], out, capsys, keywords)


BAD_PREDICTION_OPTIONS = [
    (["--bayes_mc_samples", "0"], ["--bayes_mc_samples", "at least 1"]),
    (["--batch_size", "0"], ["--batch_size", "at least 1"]),
    (["--num_workers", "-1"], ["--num_workers", "at least 0"]),
    (["--unassign_by", "confidence", "--unassign_thres", "1.5"], ["--unassign_thres", "[0, 1]"]),
    (["--unassign_by", "confidence", "--unassign_thres", "-0.1"], ["--unassign_thres", "[0, 1]"]),
    (["--unassign_thres", "-0.1"], ["--unassign_thres", "at least 0", "novelty"]),
    (["--unassign_thres", "nan"], ["--unassign_thres", "finite"]),
    (["--unassign_by", "entropy", "--unassign_thres", "-1"], ["--unassign_thres", "at least 0"]),
    (["--device", "gpu0"], ["--device", "not a device name", "cpu"]),
    pytest.param(["--device", "cuda"], ["--device", "no gpu", "--device cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")),
]


@pytest.mark.parametrize(("options", "keywords"), BAD_PREDICTION_OPTIONS, ids=lambda v: " ".join(v))
def test_prediction_option_out_of_range_is_one_line_error(options, keywords, good, tmp_path, capsys, no_outputs):
    out = tmp_path / "predictions"
    expect_error(predict_updated.main, [*predict_argv(good["data"], good["model"], out), *options], out, capsys,
                 keywords)


def test_prediction_refuses_to_write_over_its_own_inputs(good, tmp_path, capsys, no_outputs):
    data = tmp_path / "predictions.h5ad"
    data.write_bytes(good["data"].read_bytes())
    expect_error(predict_updated.main, predict_argv(data, good["model"], tmp_path, "--overwrite"), tmp_path, capsys,
                 ["--data_path", "output files", "--output_dir"])


def file_in_the_way(tmp_path: Path, where: str) -> tuple[Path, Path]:
    """An existing file at the output path, or as its parent; returns (output path, the file)."""
    blocker = tmp_path / "results"
    blocker.write_text("not a directory\n", encoding="utf-8")
    return (blocker if where == "is a file" else blocker / "run"), blocker


@pytest.mark.parametrize("where", ["is a file", "is inside a file"])
def test_prediction_output_dir_that_cannot_be_a_directory_is_one_line_error(where, good, tmp_path, capsys):
    out, blocker = file_in_the_way(tmp_path, where)
    expect_error(predict_updated.main, predict_argv(good["data"], good["model"], out), blocker, capsys,
                 ["output", str(out), "choose"])


@pytest.mark.parametrize("where", ["is a file", "is inside a file"])
def test_training_ckpt_dir_that_cannot_be_a_directory_is_one_line_error(where, good, tmp_path, capsys):
    out, blocker = file_in_the_way(tmp_path, where)
    expect_error(finetune_sparse.main, train_argv(good["data"], out), blocker, capsys, ["--ckpt_dir", str(out)])


@pytest.mark.parametrize("script", ["finetune_sparse.py", "predict_updated.py"])
def test_malformed_option_value_exits_2_without_traceback(script, good, tmp_path, capsys):
    """Values that are not a number or not a choice also exit with status 2 and name the option."""
    out = tmp_path / "out"
    if script == "finetune_sparse.py":
        main, argv = finetune_sparse.main, train_argv(good["data"], out, "--batch_size", "three")
    else:
        main, argv = predict_updated.main, predict_argv(good["data"], good["model"], out, "--batch_size", "three")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--batch_size" in err and "expected a whole number" in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_novelty_view_exits_2_naming_the_views(good, tmp_path, capsys):
    out = tmp_path / "out"
    assert finetune_sparse.main(train_argv(good["data"], out, "--novelty_parts", "mahalanobis,umap")) == 2
    err = capsys.readouterr().err
    assert "--novelty_parts" in err and "input_knn" in err and "Traceback" not in err
    assert not out.exists()
    assert finetune_sparse.default_config(novelty_parts="entropy, mahalanobis,entropy").novelty_parts == ("entropy", "mahalanobis")


# ---- end to end: real processes, real exit codes ----------------------------------------------------------------


SUBPROCESS_CASES = {
    "finetune missing data": (
        "finetune_sparse.py", lambda g, d: [*TINY, "--data_path", str(d / "nope.h5ad")], ["not found", "nope.h5ad"]),
    "finetune_updated text checkpoint": (
        "finetune_updated.py", lambda g, d: [*TINY, "--data_path", str(g["data"]),
                                             "--model_path", str(text_checkpoint(g, d))],
        ["not a readable pytorch checkpoint"]),
    "predict nan data": (
        "predict_updated.py", lambda g, d: predict_argv(with_values(nan_and_inf)(d), g["model"], d / "out"),
        ["3 of 48 cells", "nan"]),
    "predict zero samples": (
        "predict_updated.py", lambda g, d: predict_argv(g["data"], g["model"], d / "out", "--bayes_mc_samples", "0"),
        ["--bayes_mc_samples", "at least 1"]),
}


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_process_exits_2_with_one_line_and_no_traceback(case, good, tmp_path):
    script, make_argv, keywords = SUBPROCESS_CASES[case]
    argv = make_argv(good, tmp_path)
    if script != "predict_updated.py":
        argv += ["--ckpt_dir", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, keywords)
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_domain_error_names_settings_and_the_cli_spells_them_as_flags(capsys):
    """Model and data code say what is wrong and which settings fix it; only the CLI writes them as flags."""

    def job():
        raise UserError("no GPU is visible; use the CPU",
                        {"device": "cpu", "use_raw": None, "normalize": True, "pos_embed": False})

    assert run_cli(job) == 2
    assert capsys.readouterr().err.strip() == ("error: no GPU is visible; use the CPU (command line: --device cpu, "
                                               "--use_raw, --normalize, --no_pos_embed)")
