"""The training pipeline end to end on a tiny model: Stage A -> Stage B round 1 -> round 2 -> prediction, the files
each run writes, DDP with two CPU processes, resuming a killed run, the command line and the shell pipelines.

The data is a 160-cell, 200-gene, 4-class subset of scanpy's bundled pbmc68k_reduced; every run is 1-4 epochs.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

import finetune_sparse
import options
from bayesian_sparse_transformer import predict_proba_samples
from checkpoints import load_checkpoint
from options import TrainConfig
from utils import BinnedDataset, align_genes, classification_metrics, collate_batch, encode_labels, load_dataset

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SHELL_SCRIPTS = ("train_sparse.sh", "stageb_round1.sh", "stageb_round2.sh", "pipeline_common.sh")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

CLASSES_KEPT, CELLS_PER_CLASS, N_GENES = 4, 40, 200
TRAIN_CELLS = round(0.8 * CLASSES_KEPT * CELLS_PER_CLASS)  # stratified 80/20 split
BATCH = 16
STEPS_PER_EPOCH = TRAIN_CELLS // BATCH  # grad_acc 1
SEED = 7
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--h_dim", "16", "--batch_size", str(BATCH),
        "--grad_acc", "1", "--learning_rate", "1e-3", "--device", "cpu", "--seed", str(SEED)]
KL_WEIGHT, KL_ANNEAL_STEPS = 1e-4, 4 * STEPS_PER_EPOCH
BAYES = ["--bayes_head", "--kl_weight", str(KL_WEIGHT), "--kl_anneal_steps", str(KL_ANNEAL_STEPS), "--mc_samples_eval", "4"]
METRIC_COLUMNS = [
    "fold", "phase", "epoch", "prune_level", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
    "val_ece", "lr", "kl", "kl_scale", "total_params", "nonzero_params", "head_sparsity", "accepted", "peak_mem_mb",
    "seconds",
]
TIMING_COLUMNS = {"seconds", "peak_mem_mb"}


# --------------------------------------------------------------------------------------------------------------
# Helpers and shared runs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The outputs of one finetune_sparse.py run: CKPT_DIR/MODEL_NAME*."""

    directory: Path
    name: str

    def fold(self, suffix: str, fold: int = 0) -> Path:
        return self.directory / f"{self.name}{fold}_{suffix}"

    @property
    def best(self) -> Path:
        return self.fold("best.pth")

    def metrics(self, fold: int = 0) -> list[dict]:
        with open(self.fold("metrics.csv"), encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))

    def summary(self) -> dict:
        return json.loads((self.directory / f"{self.name}_summary.json").read_text(encoding="utf-8"))

    def val_cells(self, fold: int = 0) -> list[str]:
        return self.fold("val_cells.txt", fold).read_text(encoding="utf-8").split()

    def val_predictions(self, fold: int = 0) -> pd.DataFrame:
        return pd.read_csv(self.fold("val_predictions.csv", fold), index_col="cell_id")


def train(data_path: Path, directory: Path, name: str, *extra: str) -> Run:
    """finetune_sparse.main in this process on the tiny configuration; fails the test unless it exits 0."""
    argv = ["--data_path", str(data_path), *TINY, "--ckpt_dir", str(directory), "--model_name", name, *extra]
    assert finetune_sparse.main(argv) == 0
    return Run(directory, name)


def run_command(command: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", ENV)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock and memory columns, which legitimately differ between runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def val_probabilities_single_process(run: Run, checkpoint: Path, num_samples: int, seed: int,
                                     data_path: Path) -> np.ndarray:
    """Monte Carlo mean probabilities of `checkpoint` on the run's validation cells, in one process (batches of 5)."""
    loaded = load_checkpoint(checkpoint)
    data = align_genes(load_dataset(data_path, label_key="cell_type"), loaded.genes)
    position = {cell: i for i, cell in enumerate(data.cell_ids)}
    rows = [position[cell] for cell in run.val_cells()]
    labels, _ = encode_labels(data.labels[rows], loaded.classes)
    loader = DataLoader(BinnedDataset(data.matrix[rows], loaded.binning, labels), batch_size=5, collate_fn=collate_batch)
    return predict_proba_samples(loaded.model, loader, num_samples, seed=seed).mean(0)  # (cells, classes)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models train ~10x faster on one thread than on two busy cores (and subprocesses get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    """Log-normalized pbmc68k_reduced (.raw): 40 cells of each of the 4 largest types, the 200 most variable genes."""
    import anndata
    import scanpy

    raw = scanpy.datasets.pbmc68k_reduced().raw.to_adata()
    types = raw.obs["bulk_labels"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    largest = pd.Series(types).value_counts().index[:CLASSES_KEPT]
    cells = np.sort(np.concatenate([rng.choice(np.flatnonzero(types == t), CELLS_PER_CLASS, replace=False) for t in largest]))
    matrix = sp.csr_matrix(raw.X)[cells]  # (cells, genes)
    variance = np.asarray(matrix.power(2).mean(0)).ravel() - np.asarray(matrix.mean(0)).ravel() ** 2
    genes = np.sort(np.argsort(-variance)[:N_GENES])
    subset = anndata.AnnData(
        X=matrix[:, genes].astype(np.float32),
        obs=pd.DataFrame({"cell_type": types[cells]}, index=raw.obs_names[cells]),
        var=pd.DataFrame(index=raw.var_names[genes]),
    )
    path = tmp_path_factory.mktemp("data") / "pbmc_subset.h5ad"
    subset.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def stage_a(data_path, tmp_path_factory) -> Run:
    return train(data_path, tmp_path_factory.mktemp("stageA"), "stageA", "--epoch", "3", "--prune_target", "0",
                 "--learning_rate", "3e-3")


@pytest.fixture(scope="module")
def stage_b1(data_path, stage_a, tmp_path_factory) -> Run:
    return train(data_path, tmp_path_factory.mktemp("stageB1"), "stageB1", "--model_path", str(stage_a.best), *BAYES,
                 "--epoch", "4", "--pre_warm_epochs", "1", "--prune_target", "0")


@pytest.fixture(scope="module")
def stage_b2(data_path, stage_b1, tmp_path_factory) -> Run:
    return train(data_path, tmp_path_factory.mktemp("stageB2"), "stageB2", "--model_path", str(stage_b1.best), *BAYES,
                 "--epoch", "0", "--prune_target", "0.5", "--prune_step", "0.25", "--prune_ft_epochs", "1",
                 "--prune_rule", "f1", "--prune_f1_tol", "1.0")


# --------------------------------------------------------------------------------------------------------------
# 1. Stage A -> Stage B round 1 -> round 2 -> prediction
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["stage_a", "stage_b1", "stage_b2"])
def test_every_stage_writes_the_documented_outputs(stage, request):
    run: Run = request.getfixturevalue(stage)
    for suffix in ("best.pth", "last.pth", "metrics.csv", "val_cells.txt", "val_predictions.csv"):
        assert run.fold(suffix).is_file(), suffix
    with open(run.fold("metrics.csv"), encoding="utf-8", newline="") as handle:
        assert next(csv.reader(handle)) == METRIC_COLUMNS

    config = json.loads((run.directory / f"{run.name}_config.json").read_text(encoding="utf-8"))
    assert set(config["args"]) == {spec.name for spec in fields(TrainConfig)}
    assert config["args"]["model_name"] == run.name and config["versions"]["torch"] == torch.__version__

    summary = run.summary()
    assert len(summary["folds"]) == 1
    for key in ("accuracy", "macro_f1", "ece", "nll", "head_sparsity", "total_params"):
        assert summary[key] == {"mean": pytest.approx(summary["folds"][0][key]), "std": 0.0}

    log = (run.directory / f"{run.name}.log").read_text(encoding="utf-8")
    assert "confusion matrix" in log and "classification report" in log and "macro avg" in log

    predictions, cells = run.val_predictions(), run.val_cells()
    assert list(predictions.index) == cells and len(set(cells)) == len(cells) == CLASSES_KEPT * CELLS_PER_CLASS - TRAIN_CELLS
    probabilities = predictions.drop(columns=["true_label", "pred_label"])
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-4)
    assert (probabilities.idxmax(1) == predictions["pred_label"]).all()


def test_all_stages_validate_on_the_same_held_out_cells(stage_a, stage_b1, stage_b2):
    assert stage_a.val_cells() == stage_b1.val_cells() == stage_b2.val_cells()


def test_stage_a_is_deterministic_and_logs_one_row_per_epoch(stage_a):
    checkpoint = load_checkpoint(stage_a.best)
    assert checkpoint.stage == "A" and not checkpoint.model.is_bayesian
    rows = stage_a.metrics()
    assert [(r["phase"], r["epoch"]) for r in rows] == [("train", "1"), ("train", "2"), ("train", "3")]
    assert float(stage_a.summary()["macro_f1"]["mean"]) > 0.5  # it learns something: 4 balanced classes


def test_stage_b_is_bayesian_with_a_linearly_rising_kl_weight(stage_b1):
    checkpoint = load_checkpoint(stage_b1.best)
    assert checkpoint.stage == "B" and checkpoint.model.is_bayesian
    rows = stage_b1.metrics()
    assert [(r["phase"], r["epoch"]) for r in rows] == [("prewarm", "1"), ("train", "2"), ("train", "3"), ("train", "4")]
    assert float(rows[0]["kl_scale"]) == 0.0 and float(rows[0]["kl"]) == 0.0  # pre-warm: posterior means, no KL
    # kl_scale is recorded after each epoch: KL_WEIGHT * (optimizer steps with KL) / KL_ANNEAL_STEPS.
    scales = [float(r["kl_scale"]) for r in rows[1:]]
    expected = [KL_WEIGHT * min(1.0, epoch * STEPS_PER_EPOCH / KL_ANNEAL_STEPS) for epoch in (1, 2, 3)]
    np.testing.assert_allclose(scales, expected, rtol=1e-9)
    assert all(float(r["kl"]) > 0 for r in rows[1:])


def test_round_2_prunes_physically_to_the_target(stage_b1, stage_b2):
    before, after = load_checkpoint(stage_b1.best), load_checkpoint(stage_b2.best)
    assert after.stage == "B" and after.model.is_bayesian
    assert after.metrics["prune_amount"] == 0.5
    assert after.model.head.fc1.out_features == before.model.head.fc1.out_features // 2
    assert after.model.head.fc2.out_features == before.model.head.fc2.out_features // 2
    total = lambda c: sum(p.numel() for p in c.model.parameters())
    assert total(after) < total(before)
    assert after.metrics["total_params"] == total(after) < before.metrics["total_params"]

    rows = stage_b2.metrics()  # --epoch 0: a fine-tuning row per epoch and a decision row per pruning level
    assert [(r["phase"], float(r["prune_level"]), r["accepted"]) for r in rows] == [
        ("prune_ft", 0.25, ""), ("prune", 0.25, "True"), ("prune_ft", 0.5, ""), ("prune", 0.5, "True"),
    ]
    params = [int(r["total_params"]) for r in rows]
    assert params[0] == params[1] > params[2] == params[3]
    assert stage_b2.summary()["head_sparsity"]["mean"] == pytest.approx(after.model.pruning_stats()["fc12_sparsity"])
    assert after.metrics["head_sparsity"] > 0.5


def test_pruning_without_fine_tuning_computes_the_refit_features_once_and_prunes_as_recomputing_would(
        stage_b1, data_path, tmp_path, monkeypatch):
    """--prune_ft_epochs 0: nothing trains between levels, so one encoder pass over the refit cells serves them all."""
    calls = []
    compute = finetune_sparse.refit_cells
    monkeypatch.setattr(finetune_sparse, "refit_cells", lambda fold, model: calls.append(fold.index) or compute(fold, model))
    options = ("--model_path", str(stage_b1.best), *BAYES, "--epoch", "0", "--prune_target", "0.5", "--prune_step",
               "0.25", "--prune_ft_epochs", "0", "--prune_rule", "f1", "--prune_f1_tol", "1.0")
    once = train(data_path, tmp_path / "once", "once", *options)
    assert calls == [0]
    calls.clear()
    monkeypatch.setattr(finetune_sparse, "_refit_matches", lambda refit, model: False)  # recompute at every level
    every_level = train(data_path, tmp_path / "every", "every", *options)
    assert calls == [0, 0, 0]  # before the levels, then at each of 0.25 and 0.5
    kept, recomputed = load_checkpoint(once.best), load_checkpoint(every_level.best)
    assert kept.metrics["prune_amount"] == recomputed.metrics["prune_amount"] == 0.5
    for name, tensor in recomputed.model.state_dict().items():
        torch.testing.assert_close(kept.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_round_2_with_distillation_fine_tunes_toward_the_unpruned_models_training_probabilities(stage_b1, data_path, tmp_path):
    """--prune_distill keeps the unpruned model's probabilities of the training cells (as validation draws them) as
    targets in the resumable state; --prune_score snr prunes to the level asked."""
    run = train(data_path, tmp_path / "distill", "distill", "--model_path", str(stage_b1.best), *BAYES, "--epoch", "0",
                "--prune_target", "0.5", "--prune_step", "0.5", "--prune_ft_epochs", "1", "--prune_rule", "f1",
                "--prune_f1_tol", "1.0", "--prune_distill", "1", "--prune_score", "snr")
    assert load_checkpoint(run.best).metrics["prune_amount"] == 0.5
    teacher = load_checkpoint(run.fold("last.pth")).training_state["fold_state"]["teacher_probs"].numpy()

    unpruned = load_checkpoint(stage_b1.best)
    data = align_genes(load_dataset(data_path, label_key="cell_type"), unpruned.genes)
    loader = DataLoader(BinnedDataset(data.matrix, unpruned.binning), batch_size=16,
                        collate_fn=collate_batch)
    finetune_sparse.set_head(unpruned.model, posterior_means=False)  # the teacher is the sampled head, whichever mode it predicts in
    unpruned.model.set_deterministic(False)
    expected = predict_proba_samples(unpruned.model, loader, 4, seed=SEED).mean(0)  # BAYES: --mc_samples_eval 4
    training = ~np.isin(data.cell_ids, run.val_cells())
    np.testing.assert_allclose(teacher[training], expected[training], atol=1e-6)
    assert not teacher[~training].any()  # validation cells are never targets


def test_predict_on_the_round_2_checkpoint_and_held_out_cells(stage_b2, data_path, tmp_path):
    predict_updated = pytest.importorskip("predict_updated")
    if not hasattr(predict_updated, "main"):
        pytest.skip("predict_updated.py has no main(argv) yet")
    output = tmp_path / "predictions"
    argv = ["--model_path", str(stage_b2.best), "--data_path", str(data_path), "--cells", str(stage_b2.fold("val_cells.txt")),
            "--label_key", "cell_type", "--bayes_mc_samples", "4", "--output_dir", str(output), "--device", "cpu"]
    assert predict_updated.main(argv) == 0
    assert (output / "predictions.csv").is_file()
    assert len(pd.read_csv(output / "predictions.csv")) == len(stage_b2.val_cells())


# --------------------------------------------------------------------------------------------------------------
# 2. DDP
# --------------------------------------------------------------------------------------------------------------


def test_two_process_ddp_validates_every_cell_once_like_one_process(stage_a, data_path, tmp_path):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    run = Run(tmp_path / "ddp", "ddp")
    result = run_command([
        str(torchrun), "--standalone", "--nproc_per_node", "2", "finetune_sparse.py", "--data_path", str(data_path),
        *TINY, "--model_path", str(stage_a.best), *BAYES, "--epoch", "1", "--pre_warm_epochs", "0", "--prune_target", "0",
        "--ckpt_dir", str(run.directory), "--model_name", run.name,
    ], timeout=240)
    assert_ok(result)
    assert "device cpu x 2" in (run.directory / "ddp.log").read_text(encoding="utf-8")

    predictions, cells = run.val_predictions(), run.val_cells()
    assert list(predictions.index) == cells and predictions.index.is_unique  # each validation cell exactly once
    probabilities = predictions.drop(columns=["true_label", "pred_label"])
    single = val_probabilities_single_process(run, run.best, num_samples=4, seed=SEED, data_path=data_path)
    np.testing.assert_allclose(probabilities.to_numpy(), single, rtol=1e-5, atol=1e-6)

    # One epoch, one validation: the best checkpoint and the predictions file agree, and so does the metrics row
    # unless that epoch did not beat the model it continued (then the start is kept and the row is the epoch's).
    classes = list(probabilities.columns)
    labels, _ = encode_labels(predictions["true_label"].to_numpy(), classes)
    recomputed = classification_metrics(probabilities.to_numpy(), labels, classes)
    assert load_checkpoint(run.best).metrics["accuracy"] == pytest.approx(recomputed["accuracy"])
    if run.summary()["folds"][0]["kept"] == "start":
        return
    (row,) = run.metrics()
    assert float(row["val_acc"]) == pytest.approx(recomputed["accuracy"])
    assert float(row["val_macro_f1"]) == pytest.approx(recomputed["macro_f1"])
    assert float(row["val_loss"]) == pytest.approx(recomputed["nll"], rel=1e-4)
    assert float(row["val_ece"]) == pytest.approx(recomputed["ece"], abs=1e-4)


# --------------------------------------------------------------------------------------------------------------
# 3. Resume
# --------------------------------------------------------------------------------------------------------------


def _start(command: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_new(path: Path, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> float:
    """Wait until `process` (re)writes `path`; the time it did."""
    previous = path.stat().st_mtime_ns if path.exists() else None
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_mtime_ns != previous):
        if process.poll() is not None:
            pytest.fail(f"run ended (exit {process.returncode}) before writing {path.name}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no new {path.name} after {timeout} s")
        time.sleep(0.005)
    return time.monotonic()


def _kill_after_next_checkpoint(command: list[str], run: Run, log_path: Path, delay: float) -> bool:
    """Run `command` until it writes its next `last` checkpoint, `delay` s more, then SIGKILL; False if it finished.

    A resume of a run killed after its last checkpoint has nothing left to write: it may finish without one.
    """
    process = _start(command, log_path)
    path = run.fold("last.pth")
    previous = path.stat().st_mtime_ns if path.exists() else None
    deadline = time.monotonic() + 180
    while not (path.exists() and path.stat().st_mtime_ns != previous):
        if process.poll() is not None:
            assert process.returncode == 0, log_path.read_text()[-3000:]
            return False
        assert time.monotonic() < deadline, f"no new {path.name} after 180 s"
        time.sleep(0.005)
    time.sleep(delay)
    process.kill()
    return process.wait(timeout=60) != 0


def test_run_killed_twice_and_resumed_matches_an_uninterrupted_run(stage_a, data_path, tmp_path):
    """Stage B with pre-warm, MC training samples, KL annealing and two pruning levels with distillation, SIGKILLed at
    random points."""

    def command(directory: Path) -> list[str]:
        return [sys.executable, "finetune_sparse.py", "--data_path", str(data_path), *TINY, "--batch_size", "8",
                "--grad_acc", "2", "--model_path", str(stage_a.best), *BAYES, "--mc_samples", "2", "--epoch", "4",
                "--pre_warm_epochs", "1", "--prune_target", "0.5", "--prune_step", "0.25", "--prune_ft_epochs", "2",
                "--prune_rule", "f1", "--prune_f1_tol", "1.0", "--prune_distill", "0.5", "--prune_score", "snr",
                "--ckpt_dir", str(directory), "--model_name", "run"]

    whole = Run(tmp_path / "uninterrupted", "run")
    process = _start(command(whole.directory), tmp_path / "uninterrupted.log")
    first_last = _wait_for_new(whole.fold("last.pth"), process, tmp_path / "uninterrupted.log")
    assert process.wait(timeout=300) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    window = time.monotonic() - first_last  # how long the run went on after its first `last` checkpoint

    seed = random.SystemRandom().randrange(2**32)  # the global `random` is seeded by the in-process runs
    rng = random.Random(seed)
    kills: list[str] = []
    for attempt in range(4):  # a run that finishes before the kill proves nothing: try again, killing sooner
        killed = Run(tmp_path / f"killed{attempt}", "run")
        delay = rng.uniform(0.0, 0.6 * window / 2**attempt)
        if _kill_after_next_checkpoint(command(killed.directory), killed, tmp_path / f"killed{attempt}.log", delay):
            kills.append(f"{delay:.3f} s after the first last.pth, {len(killed.metrics())} metric rows")
            break
    else:
        pytest.fail(f"the run always finished before it could be killed (window {window:.2f} s)")
    # Kill the resumed run too (unless it finishes first): a resume of a resume must continue just as well.
    delay = rng.uniform(0.0, 0.6 * window)
    if _kill_after_next_checkpoint([*command(killed.directory), "--resume"], killed, tmp_path / "resumed.log", delay):
        kills.append(f"{delay:.3f} s after the resumed run's first last.pth, {len(killed.metrics())} metric rows")
    where = f"killed {'; then '.join(kills)} (seed {seed})"

    result = run_command([*command(killed.directory), "--resume"])
    assert_ok(result)
    assert "resumed from" in result.stdout, where

    assert comparable(killed.metrics()) == comparable(whole.metrics()), where
    assert killed.summary() == whole.summary(), where
    assert killed.fold("val_predictions.csv").read_text() == whole.fold("val_predictions.csv").read_text(), where
    expected, actual = load_checkpoint(whole.best), load_checkpoint(killed.best)
    assert actual.metrics == expected.metrics, where
    expected_state, actual_state = expected.model.state_dict(), actual.model.state_dict()
    assert expected_state.keys() == actual_state.keys(), where
    for key, value in expected_state.items():
        assert torch.equal(actual_state[key], value), f"{key} differs; {where}"


# --------------------------------------------------------------------------------------------------------------
# 4. Command line
# --------------------------------------------------------------------------------------------------------------


def test_every_documented_flag_is_accepted_with_scbert_defaults():
    args = options.cli_config(TrainConfig, [
        "--data_path", "x.h5ad", "--model_path", "m.pth", "--gene_num", "166", "--bin_num", "7", "--dim", "32",
        "--heads", "4", "--depth", "2", "--epoch", "3", "--batch_size", "4", "--grad_acc", "2",
        "--learning_rate", "2e-4", "--pos_embed", "--no_pos_embed", "--gene2vec_path", "g.npy", "--bayes_head",
        "--kl_weight", "1e-5", "--kl_anneal_steps", "50", "--mc_samples", "2", "--mc_samples_eval", "16",
        "--pre_warm_epochs", "2", "--prune_target", "0.4", "--prune_step", "0.2", "--prune_ft_epochs", "1",
        "--prune_f1_tol", "0.05", "--prune_dim", "1", "--prune_layers", "fc1", "--prune_mode", "mask",
        "--cv_splits", "3", "--patience", "5", "--valid_every", "2", "--seed", "1", "--ckpt_dir", "out",
        "--model_name", "m", "--l1_lambda", "1e-4", "--weight_decay", "0", "--dropout", "0.1", "--head_lr_mult", "10",
        "--label_key", "celltype", "--device", "cpu", "--num_workers", "2", "--amp", "--resume",
        "--trainable_layers", "2",
    ], "")
    assert (args.gene_num, args.bin_num, args.dim, args.heads, args.depth, args.pos_embed) == (166, 7, 32, 4, 2, False)
    assert args.bayes_head and args.amp and args.resume
    assert (args.prune_dim, args.prune_layers, args.prune_mode, args.trainable_layers) == (1, ("fc1",), "mask", 2)

    defaults = finetune_sparse.default_config()
    parser = finetune_sparse.build_parser()
    assert defaults.gene_num is None and "166" in next(a.help for a in parser._actions if a.dest == "gene_num")
    # bin_num: scBERT's 5 for a fresh model, the checkpoint's when starting from one (resolved at run time).
    assert (defaults.bin_num, defaults.dim, defaults.heads, defaults.depth) == (None, 200, 10, 6)
    assert finetune_sparse.DEFAULT_BIN_NUM == 5
    assert (defaults.kl_weight, defaults.kl_anneal_steps, defaults.mc_samples, defaults.mc_samples_eval) == (
        1e-6, 10000, 1, 8)
    assert (defaults.prune_target, defaults.prune_step, defaults.prune_ft_epochs) == (0.3, 0.1, 4)
    assert (defaults.prune_layers, defaults.prune_mode, defaults.pos_embed) == (("fc1", "fc2"), "physical", True)
    assert not defaults.bayes_head and not defaults.resume


def test_baseline_entry_point_defaults_to_no_bayes_no_pruning_and_five_folds():
    import finetune_updated

    defaults = options.cli_config(TrainConfig, [], "", defaults=finetune_updated.BASELINE_DEFAULTS)
    assert (defaults.bayes_head, defaults.prune_target, defaults.cv_splits) == (False, 0.0, 5)
    assert defaults.dim == 200  # everything else as finetune_sparse.py


# --------------------------------------------------------------------------------------------------------------
# 5. Options
# --------------------------------------------------------------------------------------------------------------


def test_trainable_layers_0_trains_only_the_head_and_final_norm(stage_a, data_path, tmp_path):
    run = train(data_path, tmp_path, "frozen", "--model_path", str(stage_a.best), "--epoch", "1", "--prune_target", "0",
                "--trainable_layers", "0", "--learning_rate", "1e-2")
    before, after = load_checkpoint(stage_a.best).model, load_checkpoint(run.fold("last.pth")).model
    after_encoder = dict(after.encoder.named_parameters())
    for name, value in before.encoder.named_parameters():
        if not name.startswith("norm."):
            assert torch.equal(after_encoder[name], value), name
    after_head = dict(after.head.named_parameters())
    assert any(not torch.equal(after_head[name], value) for name, value in before.head.named_parameters())


def test_epoch_0_from_scratch_is_refused_before_writing_anything(data_path, tmp_path, capsys):
    argv = ["--data_path", str(data_path), *TINY, "--epoch", "0", "--ckpt_dir", str(tmp_path / "out")]
    assert finetune_sparse.main(argv) == 2
    assert "--epoch 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_epoch_0_from_a_checkpoint_without_pruning_evaluates_it_as_the_best_model(stage_a, data_path, tmp_path):
    run = train(data_path, tmp_path, "eval", "--model_path", str(stage_a.best), "--epoch", "0", "--prune_target", "0")
    assert run.fold("val_predictions.csv").is_file()
    source, best = load_checkpoint(stage_a.best), load_checkpoint(run.best)
    assert best.metrics["accuracy"] == pytest.approx(source.metrics["accuracy"])
    for key, value in source.model.state_dict().items():
        assert torch.equal(best.model.state_dict()[key], value), key


def test_two_folds_write_both_and_summarise_mean_and_std(data_path, tmp_path):
    run = train(data_path, tmp_path, "cv", "--epoch", "1", "--prune_target", "0", "--cv_splits", "2")
    for fold in (0, 1):
        for suffix in ("best.pth", "last.pth", "metrics.csv", "val_cells.txt", "val_predictions.csv"):
            assert run.fold(suffix, fold).is_file(), (fold, suffix)
    assert run.val_cells(0) != run.val_cells(1)
    summary = run.summary()
    assert len(summary["folds"]) == 2
    for key in ("accuracy", "macro_f1", "ece", "nll"):
        values = [fold[key] for fold in summary["folds"]]
        assert summary[key]["mean"] == pytest.approx(np.mean(values))
        assert summary[key]["std"] == pytest.approx(np.std(values))
        assert values == [pytest.approx(load_checkpoint(run.best.with_name(f"cv{f}_best.pth")).metrics[key]) for f in (0, 1)]


def test_baseline_script_runs_two_deterministic_unpruned_folds(data_path, tmp_path):
    result = run_command([sys.executable, "finetune_updated.py", "--data_path", str(data_path), *TINY, "--epoch", "1",
                          "--cv_splits", "2", "--ckpt_dir", str(tmp_path)])
    assert_ok(result)
    run = Run(tmp_path, "finetune_baseline")
    assert len(run.summary()["folds"]) == 2
    for fold in (0, 1):
        checkpoint = load_checkpoint(run.fold("best.pth", fold))
        assert checkpoint.stage == "A" and not checkpoint.model.is_bayesian
        assert checkpoint.metrics["prune_amount"] == 0.0 and checkpoint.metrics["head_sparsity"] == 0.0
        assert {row["phase"] for row in run.metrics(fold)} == {"train"}


# --------------------------------------------------------------------------------------------------------------
# 6. Shell pipelines
# --------------------------------------------------------------------------------------------------------------


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    result = run_command([shellcheck, "-x", *SHELL_SCRIPTS], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_sparse_sh_runs_the_whole_pipeline_into_a_directory_with_a_space(data_path, tmp_path):
    predict_updated = pytest.importorskip("predict_updated")
    if not hasattr(predict_updated, "main"):
        pytest.skip("predict_updated.py has no main(argv) yet")
    run_dir = tmp_path / "my runs"
    env = {**ENV, "PATH": f"{VENV_BIN}{os.pathsep}{ENV.get('PATH', '')}", "PRESET": "demo", "DIM": "16", "DEPTH": "1",
           "HEADS": "2", "DIM_HEAD": "8", "H_DIM": "16", "EPOCHS_A": "1", "EPOCHS_B": "1", "PRUNE_TARGET": "0.2",
           "PRUNE_STEP": "0.1", "PRUNE_FT_EPOCHS": "1", "MC_SAMPLES": "2", "DEVICE": "cpu", "RUN_DIR": str(run_dir),
           "DATA_PATH": str(data_path), "CV_SPLITS": "2", "PREDICT_PATH": str(data_path), "PREDICT_LABEL_KEY": "cell_type"}
    result = run_command(["bash", "train_sparse.sh"], timeout=400, env=env)
    assert_ok(result)
    summary = result.stdout[result.stdout.index("== Summary"):].splitlines()
    assert summary[1].split()[:4] == ["stage", "cells", "accuracy", "macro-F1"]
    rows = [line.split() for line in summary[2:5]]
    assert [row[0] for row in rows] == ["stageA", "stageB1", "stageB2"]
    # Out-of-fold: the two folds' validation cells together are every cell once.
    assert all(int(row[1]) == CLASSES_KEPT * CELLS_PER_CLASS for row in rows)
    assert summary[5] == f"final model: {run_dir / 'stageB2'}"
    assert len(list((run_dir / "stageB2").glob("*_best.pth"))) == 2
    assert (run_dir / "predictions" / "predictions.csv").is_file()
    assert json.loads((run_dir / "predictions" / "run.json").read_text())["args"]["model_path"] == str(run_dir / "stageB2")


def test_resume_of_a_finished_run_returns_its_results(tmp_path, data_path):
    """--resume after every fold has finished must not rebuild (and mismatch) the optimizer and schedule."""
    argv = ["--data_path", str(data_path), "--ckpt_dir", str(tmp_path / "run"), "--model_name", "done",
            *TINY, "--epoch", "1", "--prune_target", "0", "--cv_splits", "2"]
    assert finetune_sparse.main(argv) == 0
    first = (tmp_path / "run" / "done_summary.json").read_text()
    assert finetune_sparse.main([*argv, "--resume"]) == 0
    assert (tmp_path / "run" / "done_summary.json").read_text() == first


def test_our_checkpoint_as_pretrained_encoder_for_new_cell_types(tmp_path, data_path, stage_a, capsys):
    """Stage A from one of our checkpoints on other cell types reuses its encoder with a new head; Stage B refuses."""
    import anndata

    adata = anndata.read_h5ad(data_path)
    kept = adata.obs["cell_type"].astype(str).to_numpy()
    renamed = np.where(kept == kept[0], "NewType", kept)  # one type the checkpoint has never seen
    adata.obs["cell_type"] = renamed
    new_data = tmp_path / "new_types.h5ad"
    adata.write_h5ad(new_data)

    run = train(new_data, tmp_path / "transfer", "transfer", "--model_path", str(stage_a.best), "--epoch", "1",
                "--prune_target", "0")
    transferred = load_checkpoint(run.best)
    source = load_checkpoint(stage_a.best)
    assert "NewType" in transferred.classes and transferred.genes == source.genes
    # Default for a reused encoder (as for scBERT's): only the last block and the final norm train; depth 1 here,
    # so compare the embeddings, which stay frozen.
    assert torch.equal(transferred.model.encoder.token_emb.weight, source.model.encoder.token_emb.weight)

    out = tmp_path / "stageB"
    argv = ["--data_path", str(new_data), *TINY, "--ckpt_dir", str(out), "--model_name", "b",
            "--model_path", str(stage_a.best), *BAYES, "--epoch", "1"]
    assert finetune_sparse.main(argv) == 2
    assert "not among the checkpoint's classes" in capsys.readouterr().err
    assert not out.exists()
