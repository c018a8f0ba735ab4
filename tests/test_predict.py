"""predict_updated.py: CLI predictions equal the Python API's, repeat exactly, survive gene reordering, and come with
the promised files, metrics and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader

import predict_updated
from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig, predict_proba_samples
from binning import bin_expression
from checkpoints import load_checkpoint, save_checkpoint
from performer_pytorch import PerformerConfig
from utils import BinnedDataset, align_genes, collate_batch, load_dataset, uncertainty_summary

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["B cell", "NK", "T cell"]
GENES = [f"GENE{i}" for i in range(30)]
N_CELLS = 60
BIN_NUM = 5
PREDICTION_COLUMNS = ["cell_id", "pred_label", "pred_unassigned", "pred_confidence", "pred_entropy",
                      "pred_expected_entropy", "pred_mutual_info", "pred_std"]
OBS_COLUMNS = ["pred_label", "pred_confidence", "pred_entropy", "pred_expected_entropy", "pred_mutual_info",
               "pred_std", "pred_unassigned"]
PLOTS = ["reliability.png", "confusion_matrix.png", "accuracy_coverage.png", "uncertainty_hist.png", "umap.png"]


# ---- fixtures: a synthetic data set whose classes raise one block of genes each, and a model trained on it ----


def synthetic_adata(labels: list[str], seed: int = 0) -> anndata.AnnData:
    """Log-normalized-looking values in [0, 6), half zeros, with genes 10c..10c+9 raised for class c."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((len(labels), len(GENES))) < 0.5, 0, rng.uniform(0, 4, (len(labels), len(GENES))))
    for row, label in enumerate(labels):
        if label in CLASSES:
            block = CLASSES.index(label) * 10
            x[row, block:block + 10] += rng.uniform(1, 2, 10)
    obs = pd.DataFrame({"cell_type": labels}, index=[f"cell{i}" for i in range(len(labels))])
    adata = anndata.AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=GENES))
    adata.obsm["X_umap"] = rng.normal(size=(len(labels), 2))
    return adata


def tiny_stage_b_model(genes: list[str], classes: list[str], x: np.ndarray | None = None,
                       labels: np.ndarray | None = None, seed: int = 0) -> BayesianSparseTransformer:
    """A tiny model, fitted for a few steps when data is given (mostly right, never certain), then made Bayesian
    and pruned the way Stage B leaves it."""
    torch.manual_seed(seed)
    seq_len = len(genes) + 1
    encoder = PerformerConfig(num_tokens=BIN_NUM + 2, max_seq_len=seq_len, dim=16, depth=1, heads=2, dim_head=8,
                              nb_features=16)
    head = HeadConfig(seq_len=seq_len, dim=16, num_classes=len(classes), hidden1=16, hidden2=8)
    model = BayesianSparseTransformer(ModelConfig(encoder, head))
    if x is not None:
        tokens, targets = bin_expression(x, BIN_NUM), torch.as_tensor(labels)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        for _ in range(15):
            optimizer.zero_grad()
            F.cross_entropy(model(tokens), targets).backward()
            optimizer.step()
    model.to_bayesian(init_log_sigma=-3.0)
    model.prune(0.25)
    return model.eval()


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    labels = [CLASSES[i % 3] for i in range(N_CELLS)]
    adata = synthetic_adata(labels)
    data_path = root / "data.h5ad"
    adata.write_h5ad(data_path)
    model = tiny_stage_b_model(GENES, CLASSES, adata.X.toarray(), np.arange(N_CELLS) % 3)
    model_path = root / "model.pth"
    save_checkpoint(model_path, model, genes=GENES, classes=CLASSES, bin_num=BIN_NUM, stage="B")
    return {"root": root, "data": data_path, "model": model_path}


def run_cli(setup: dict, out: Path, *extra: str, data: Path | None = None) -> Path:
    argv = ["--data_path", str(data or setup["data"]), "--model_path", str(setup["model"]), "--label_key",
            "cell_type", "--output_dir", str(out), *extra]
    assert predict_updated.main(argv) == 0
    return out


def read_outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(out / "predictions.csv"), pd.read_csv(out / "probabilities.csv")


# ---- predictions --------------------------------------------------------------------------------------------


def test_cli_equals_python_api_and_repeats_exactly(setup, tmp_path):
    # The same batch size as the API call below: float32 GEMMs round differently for other batch shapes (~1e-8).
    first = run_cli(setup, tmp_path / "a", "--bayes_mc_samples", "8", "--seed", "7", "--batch_size", "16")
    second = run_cli(setup, tmp_path / "b", "--bayes_mc_samples", "8", "--seed", "7", "--batch_size", "16")
    assert (first / "predictions.csv").read_bytes() == (second / "predictions.csv").read_bytes()

    checkpoint = load_checkpoint(setup["model"])
    data = align_genes(load_dataset(setup["data"]), checkpoint.genes)
    loader = DataLoader(BinnedDataset(data.matrix, checkpoint.binning), batch_size=16, collate_fn=collate_batch)
    api = uncertainty_summary(predict_proba_samples(checkpoint.model, loader, 8, seed=7))
    predictions, probabilities = read_outputs(first)
    # the outputs keep float32: the same values to one float32 step (2**-23 relative)
    np.testing.assert_allclose(probabilities[CLASSES].to_numpy(), api["mean_probs"], rtol=1.2e-7, atol=6e-8)
    for key in ("confidence", "entropy", "expected_entropy", "mutual_info", "pred_std"):
        np.testing.assert_allclose(predictions[predict_updated.CELL_COLUMNS[key]].to_numpy(), api[key], rtol=1.2e-7,
                                   atol=6e-8)
    assert predictions["pred_top_label"].tolist() == [CLASSES[i] for i in api["pred"]]
    assert api["mutual_info"].max() > 1e-4  # the head really is sampled, so the comparison means something


def test_predictions_do_not_depend_on_batch_size(setup, tmp_path):
    small = run_cli(setup, tmp_path / "small", "--batch_size", "7")
    large = run_cli(setup, tmp_path / "large", "--batch_size", "64")
    np.testing.assert_allclose(read_outputs(small)[1][CLASSES], read_outputs(large)[1][CLASSES], atol=1e-6)


def test_single_sample_is_the_deterministic_softmax(setup, tmp_path):
    predictions, probabilities = read_outputs(run_cli(setup, tmp_path / "out", "--bayes_mc_samples", "1"))
    model = load_checkpoint(setup["model"]).model.eval()
    model.set_deterministic(True)
    with torch.no_grad():
        expected = model(bin_expression(anndata.read_h5ad(setup["data"]).X.toarray(), BIN_NUM)).softmax(-1)
    np.testing.assert_allclose(probabilities[CLASSES].to_numpy(), expected.numpy(), atol=1e-6)
    assert np.all(predictions["pred_mutual_info"] == 0) and np.all(predictions["pred_std"] == 0)


def test_shuffled_and_missing_genes_match_zeroed_genes(setup, tmp_path):
    adata = anndata.read_h5ad(setup["data"])
    removed = ["GENE3", "GENE14", "GENE25"]
    order = np.random.default_rng(1).permutation([g for g in GENES if g not in removed])
    shuffled = adata[:, order].copy()
    zeroed = adata.copy()
    zeroed.X = zeroed.X.toarray()
    zeroed.X[:, [GENES.index(g) for g in removed]] = 0
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    zeroed.write_h5ad(tmp_path / "zeroed.h5ad")

    with pytest.warns(UserWarning, match=f"^{len(removed)} of {len(GENES)} model genes are missing"):
        on_shuffled = run_cli(setup, tmp_path / "s", data=tmp_path / "shuffled.h5ad")
    on_zeroed = run_cli(setup, tmp_path / "z", data=tmp_path / "zeroed.h5ad")
    for got, want in zip(read_outputs(on_shuffled), read_outputs(on_zeroed)):
        pd.testing.assert_frame_equal(got, want, rtol=0, atol=1e-12)


def test_cells_file_predicts_only_those_cells(setup, tmp_path):
    full = read_outputs(run_cli(setup, tmp_path / "full"))[1]
    wanted = ["cell9", "cell2", "cell40", "cell2"]  # any order, duplicates allowed
    (tmp_path / "cells.txt").write_text("\n".join(wanted) + "\n\n", encoding="utf-8")
    out = run_cli(setup, tmp_path / "subset", "--cells", str(tmp_path / "cells.txt"))
    subset = read_outputs(out)[1]
    assert subset["cell_id"].tolist() == ["cell2", "cell9", "cell40"]  # data order
    expected = full.set_index("cell_id").loc[subset["cell_id"]]
    np.testing.assert_allclose(subset[CLASSES].to_numpy(), expected[CLASSES].to_numpy(), atol=1e-6)
    assert anndata.read_h5ad(out / "predictions.h5ad").obs_names.tolist() == ["cell2", "cell9", "cell40"]


@pytest.mark.parametrize(("rule", "threshold", "expected"), [
    ("confidence", "1.0", True), ("confidence", "0", False), ("entropy", "0", True), ("mutual_info", "100", False),
])
def test_unassigned_rule_extremes(setup, tmp_path, rule, threshold, expected):
    predictions, _ = read_outputs(run_cli(setup, tmp_path / "out", "--unassign_by", rule, "--unassign_thres", threshold))
    assert predictions["pred_confidence"].max() < 1  # else confidence < 1.0 could not hold for every cell
    assert (predictions["pred_unassigned"] == expected).all()
    expected_labels = "Unassigned" if expected else predictions["pred_top_label"]
    assert (predictions["pred_label"] == expected_labels).all()


@pytest.mark.parametrize(("rule", "threshold"), [("confidence", 0.6), ("entropy", 0.8), ("mutual_info", 0.005)])
def test_unassigned_rule_splits_cells_at_the_threshold(setup, tmp_path, rule, threshold):
    predictions, _ = read_outputs(run_cli(setup, tmp_path / "out", "--unassign_by", rule, "--unassign_thres",
                                          str(threshold)))
    score = predictions[predict_updated.CELL_COLUMNS[rule]]
    expected = score < threshold if rule == "confidence" else score > threshold
    assert 0 < expected.sum() < len(predictions)  # the threshold really splits the cells
    pd.testing.assert_series_equal(predictions["pred_unassigned"], expected, check_names=False)


# ---- outputs and metrics -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(setup) -> Path:
    return run_cli(setup, setup["root"] / "default_run")


def test_outputs_have_promised_columns_and_annotations(default_run):
    predictions, probabilities = read_outputs(default_run)
    assert predictions.columns[: len(PREDICTION_COLUMNS)].tolist() == PREDICTION_COLUMNS
    assert "true_label" in predictions.columns and len(predictions) == N_CELLS
    assert probabilities.columns.tolist() == ["cell_id", *CLASSES]
    np.testing.assert_allclose(probabilities[CLASSES].sum(axis=1), 1, atol=1e-9)

    adata = anndata.read_h5ad(default_run / "predictions.h5ad")
    assert adata.obs_names.tolist() == predictions["cell_id"].tolist()
    assert set(OBS_COLUMNS) <= set(adata.obs.columns)
    assert isinstance(adata.obs["pred_label"].dtype, pd.CategoricalDtype)
    assert adata.obs["pred_label"].astype(str).tolist() == predictions["pred_label"].tolist()
    np.testing.assert_allclose(adata.obsm["pred_probabilities"], probabilities[CLASSES], atol=1e-6)
    assert list(adata.uns["pred"]["classes"]) == CLASSES
    meta = adata.uns["pred"]
    assert meta["bayes_mc_samples"] == 8 and meta["seed"] == 2021 and meta["unassign_by"] == "confidence"
    assert "torch" in meta["versions"]
    run = json.loads((default_run / "run.json").read_text())
    assert run["summary"]["n_cells"] == N_CELLS and run["args"]["bayes_mc_samples"] == 8


def test_metrics_agree_with_sklearn_and_plots_are_pngs(default_run):
    predictions, _ = read_outputs(default_run)
    metrics = json.loads((default_run / "metrics.json").read_text())
    truth, predicted = predictions["true_label"], predictions["pred_top_label"]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert 0.5 < metrics["accuracy"] < 1  # a fitted model with some errors, so the AUROCs below are defined
    for table in ("misclassification_auroc", "accuracy_at_coverage"):
        assert set(metrics[table]) == {"1-confidence", "entropy", "mutual_info", "pred_std"}
    assert all(0 <= v <= 1 for v in metrics["misclassification_auroc"].values())
    assert set(metrics["accuracy_at_coverage"]["entropy"]) == {"1.0", "0.9", "0.8", "0.7", "0.5"}
    assert metrics["n_unseen_label_cells"] == 0 and "unseen_type_auroc" not in metrics
    for name in PLOTS:
        content = (default_run / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 5000, name


def test_unseen_labels_are_left_out_of_metrics_and_flagged(setup, tmp_path):
    labels = [CLASSES[i % 3] if i % 5 else "Plasma" for i in range(N_CELLS)]
    synthetic_adata(labels).write_h5ad(tmp_path / "novel.h5ad")
    out = run_cli(setup, tmp_path / "out", data=tmp_path / "novel.h5ad")
    metrics = json.loads((out / "metrics.json").read_text())
    predictions, _ = read_outputs(out)
    known = predictions["true_label"] != "Plasma"
    assert metrics["n_unseen_label_cells"] == (~known).sum() == N_CELLS // 5
    assert metrics["unseen_labels"] == {"Plasma": N_CELLS // 5}
    assert metrics["n_cells"] == known.sum()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(predictions["true_label"][known], predictions["pred_top_label"][known]))
    assert set(metrics["unseen_type_auroc"]) == {"1-confidence", "entropy", "mutual_info", "pred_std"}


def test_without_label_key_there_is_no_evaluation(setup, tmp_path):
    out = tmp_path / "out"
    argv = ["--data_path", str(setup["data"]), "--model_path", str(setup["model"]), "--output_dir", str(out)]
    assert predict_updated.main(argv) == 0
    assert "true_label" not in read_outputs(out)[0].columns
    assert not (out / "metrics.json").exists() and not (out / "reliability.png").exists()
    assert (out / "umap.png").exists()  # needs no labels


def test_bundled_data_is_evaluated_against_bulk_labels_by_default(tmp_path, capsys):
    data = load_dataset(None)
    classes = sorted(str(c) for c in set(data.labels) - {"Dendritic"})  # never seen by the model: a novel type
    seen = np.isin(data.labels, classes)
    model = tiny_stage_b_model(data.genes, classes)  # untrained: only the plumbing is under test here
    save_checkpoint(tmp_path / "m.pth", model, genes=data.genes, classes=classes, bin_num=BIN_NUM, stage="B")
    out = tmp_path / "out"
    assert predict_updated.main(["--model_path", str(tmp_path / "m.pth"), "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_unseen_label_cells"] == int((~seen).sum()) > 0
    assert metrics["n_cells"] == int(seen.sum())
    assert (out / "umap.png").stat().st_size > 0
    stdout = capsys.readouterr().out
    assert "obs['bulk_labels']" in stdout and "never saw" in stdout and stdout.splitlines()[-1].startswith("done: 700 cells")


# ---- errors: exit status 2, one line, nothing written ------------------------------------------------------


def test_user_errors_exit_2_with_one_line_and_no_outputs(setup, tmp_path, capsys):
    low_overlap = synthetic_adata(["NK"] * 5)
    low_overlap.var_names = [f"OTHER{i}" if i >= 10 else g for i, g in enumerate(GENES)]
    low_overlap.write_h5ad(tmp_path / "low_overlap.h5ad")
    (tmp_path / "cells.txt").write_text("cell1\nnot_a_cell\nalso_missing\n", encoding="utf-8")
    cases = {
        "missing model": (["--model_path", str(tmp_path / "nope.pth")], "checkpoint not found"),
        "zero samples": (["--bayes_mc_samples", "0"], "--bayes_mc_samples must be at least 1"),
        "confidence above 1": (["--unassign_by", "confidence", "--unassign_thres", "1.5"], "must be in [0, 1]"),
        "negative entropy": (["--unassign_by", "entropy", "--unassign_thres", "-1"], "at least 0"),
        "low overlap": (["--data_path", str(tmp_path / "low_overlap.h5ad")], "only 10 of 30 model genes"),
        "unknown cells": (["--cells", str(tmp_path / "cells.txt")], "2 of 3 cell ids"),
    }
    base = {"--data_path": str(setup["data"]), "--model_path": str(setup["model"]), "--label_key": "cell_type"}
    for name, (extra, message) in cases.items():
        options = {**base, **dict(zip(extra[::2], extra[1::2]))}
        out = tmp_path / name.replace(" ", "_")
        argv = [item for pair in options.items() for item in pair] + ["--output_dir", str(out)]
        assert predict_updated.main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (name, err)
        assert not out.exists(), name


def test_low_overlap_is_accepted_with_allow_missing_genes(setup, tmp_path):
    adata = anndata.read_h5ad(setup["data"])[:, :10].copy()
    adata.write_h5ad(tmp_path / "few_genes.h5ad")
    with pytest.warns(UserWarning, match="20 of 30 model genes are missing"):
        out = run_cli(setup, tmp_path / "out", "--allow_missing_genes", data=tmp_path / "few_genes.h5ad")
    assert len(read_outputs(out)[0]) == N_CELLS


def test_existing_outputs_are_kept_without_overwrite(setup, tmp_path, capsys):
    out = run_cli(setup, tmp_path / "out", "--seed", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["--data_path", str(setup["data"]), "--model_path", str(setup["model"]), "--output_dir", str(out)]
    assert predict_updated.main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert predict_updated.main([*argv, "--overwrite", "--label_key", "cell_type"]) == 0
    assert (out / "predictions.csv").read_bytes() != before["predictions.csv"]  # seed 2021, not 1


def test_command_line_exit_status_and_message(setup, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "predict_updated.py"), "--data_path", str(setup["data"]), "--model_path",
         str(tmp_path / "missing.pth"), "--output_dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: checkpoint not found") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_calls_favour_rarer_types_by_call_balance_and_probabilities_stay(setup, tmp_path):
    checkpoint = load_checkpoint(setup["model"])
    counts = [200, 20, 2]  # the training shares the calls are weighed against (checkpoints store them)
    model_path = tmp_path / "counted.pth"
    save_checkpoint(model_path, checkpoint.model, genes=GENES, classes=CLASSES, bin_num=BIN_NUM, stage="B",
                    class_counts=counts)
    assert load_checkpoint(model_path).class_counts == counts
    runs = {}
    for balance in ("0", "1"):
        out = tmp_path / f"balance_{balance}"
        argv = ["--data_path", str(setup["data"]), "--model_path", str(model_path), "--label_key", "cell_type",
                "--output_dir", str(out), "--seed", "3", "--call_balance", balance]
        assert predict_updated.main(argv) == 0
        runs[balance] = (*read_outputs(out), json.loads((out / "metrics.json").read_text()))
    plain, plain_probs, plain_metrics = runs["0"]
    balanced, balanced_probs, balanced_metrics = runs["1"]
    pd.testing.assert_frame_equal(plain_probs, balanced_probs)  # the probabilities do not move
    probs = plain_probs[CLASSES].to_numpy()
    shares = np.asarray(counts) / sum(counts)
    assert plain["pred_top_label"].tolist() == [CLASSES[i] for i in probs.argmax(1)]
    expected = (probs / shares).argmax(1)
    assert balanced["pred_top_label"].tolist() == [CLASSES[i] for i in expected]
    assert (expected != probs.argmax(1)).any()  # the weights really change some calls here
    np.testing.assert_allclose(balanced[predict_updated.CELL_COLUMNS["confidence"]], probs[np.arange(len(probs)), expected])
    truth = balanced["true_label"] if "true_label" in balanced else anndata.read_h5ad(setup["data"]).obs["cell_type"]
    assert balanced_metrics["accuracy"] == pytest.approx(accuracy_score(truth, balanced["pred_top_label"]))
    assert balanced_metrics["nll"] == pytest.approx(plain_metrics["nll"])


def test_call_balance_outside_zero_to_one_is_refused(setup, tmp_path, capsys):
    assert predict_updated.main(["--data_path", str(setup["data"]), "--model_path", str(setup["model"]),
                                 "--output_dir", str(tmp_path / "out"), "--call_balance", "1.5"]) == 2
    assert "call_balance" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
