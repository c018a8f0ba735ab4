"""Train and evaluate the model on subsets of the bundled PBMC data (shared by the data benchmarks).

The benchmarks split the data themselves, write the training cells to an .h5ad file and train with
`finetune_sparse.main` exactly as a user would (it makes its own 80/20 validation split for early stopping);
the held-out cells are then predicted from the saved checkpoint with `predict_proba_samples`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from torch.utils.data import DataLoader

import finetune_sparse
from bayesian_sparse_transformer import load_checkpoint, predict_proba_samples
from utils import (
    BinnedDataset,
    ExpressionData,
    classification_metrics,
    collate_batch,
    encode_labels,
    load_dataset,
    misclassification_auroc,
    uncertainty_summary,
)

# The demo configuration of pipeline_common.sh (PRESET=demo); every key is a benchmark option too.
DEMO = dict(
    dim=32, depth=1, heads=2, dim_head=16, h_dim=32, batch_size=16, grad_acc=1, learning_rate=1e-3,
    epochs_a=12, patience=4, epochs_b=4, pre_warm_epochs=1, kl_anneal_steps=100, learning_rate_b=2e-4,
    init_log_sigma=-4.0, prior_sigma=0.05, kl_weight=1e-3, prune_target=0.5, prune_step=0.1, prune_ft_epochs=1, prune_f1_tol=0.03,
    mc_samples=8, genes=0, max_cells=0, min_cells_per_class=0,
)
# Tiny model, few genes and cells, one epoch per stage: seconds, for CI.
SMOKE_TRAINING = DEMO | dict(
    dim=8, depth=1, heads=1, dim_head=8, h_dim=8, epochs_a=1, patience=1, epochs_b=1, pre_warm_epochs=0,
    kl_anneal_steps=10, prune_target=0.2, prune_step=0.1, prune_ft_epochs=1, mc_samples=4, genes=32, max_cells=160,
    min_cells_per_class=60,
)
UNCERTAINTY_SCORES = ("one_minus_confidence", "entropy", "mutual_info")


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


def run_finetune(argv: list[str], out_dir: Path, name: str) -> dict:
    """`finetune_sparse.main(argv)` (which writes into out_dir/name) with its console output in out_dir/finetune.log.

    Returns the run's summary JSON plus its wall time and the path of its best checkpoint.
    """
    log_path = out_dir / "finetune.log"
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
        status = finetune_sparse.main(argv)
    for handler in logging.getLogger("finetune").handlers:  # close the run's log file before the next run
        handler.close()
    logging.getLogger("finetune").handlers.clear()
    if status != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8").splitlines()[-10:])
        raise RuntimeError(f"finetune_sparse.main failed (exit status {status}); see {log_path}:\n{tail}")
    result = json.loads((out_dir / name / f"{name}_summary.json").read_text(encoding="utf-8"))
    result["seconds"] = time.perf_counter() - started
    result["checkpoint"] = str(out_dir / name / f"{name}0_best.pth")
    return result


def _finetune(config: dict, train_path: Path, out_dir: Path, name: str, seed: int, stage_args: list[str]) -> dict:
    """One finetune_sparse run with the options every stage shares plus its own `stage_args`."""
    argv = [
        "--data_path", str(train_path), "--label_key", "cell_type", "--device", "cpu", "--seed", str(seed),
        "--batch_size", str(config["batch_size"]), "--grad_acc", str(config["grad_acc"]),
        "--patience", str(config["patience"]),
        "--mc_samples_eval", str(config["mc_samples"]), "--ckpt_dir", str(out_dir / name), "--model_name", name,
        *stage_args,
    ]
    return run_finetune(argv, out_dir, name)


def train_stage_a(config: dict, train_path: Path, out_dir: Path, seed: int) -> dict:
    """Deterministic encoder + head from scratch (Stage A)."""
    return _finetune(config, train_path, out_dir, "stageA", seed, [
        "--dim", str(config["dim"]), "--depth", str(config["depth"]), "--heads", str(config["heads"]),
        "--dim_head", str(config["dim_head"]), "--h_dim", str(config["h_dim"]), "--epoch", str(config["epochs_a"]),
        "--learning_rate", str(config["learning_rate"]), "--prune_target", "0",
    ])


def _stage_b_args(config: dict) -> list[str]:
    """Options both Stage B rounds share (as STAGE_B_ARGS in pipeline_common.sh)."""
    return [
        "--bayes_head", "--learning_rate", str(config["learning_rate_b"]), "--kl_weight", str(config["kl_weight"]),
        "--kl_anneal_steps",
        str(config["kl_anneal_steps"]), "--init_log_sigma", str(config["init_log_sigma"]), "--prior_sigma",
        str(config["prior_sigma"]),
    ]


def train_stage_b(config: dict, train_path: Path, out_dir: Path, seed: int, stage_a: str) -> dict:
    """Bayesian fc1/fc2 ported from Stage A, pre-warm, annealed KL, no pruning (Stage B round 1)."""
    return _finetune(config, train_path, out_dir, "stageB", seed, [
        "--model_path", stage_a, *_stage_b_args(config), "--epoch", str(config["epochs_b"]),
        "--pre_warm_epochs", str(config["pre_warm_epochs"]), "--prune_target", "0",
    ])


def prune_round2(config: dict, train_path: Path, out_dir: Path, seed: int, stage_b: str, *, name: str = "round2",
                 target: float | None = None, step: float | None = None, f1_tol: float | None = None,
                 mode: str = "physical") -> dict:
    """Round 2: progressive structured pruning of a Stage B checkpoint, fine-tuning after each step."""
    target = config["prune_target"] if target is None else target
    step = config["prune_step"] if step is None else step
    f1_tol = config["prune_f1_tol"] if f1_tol is None else f1_tol
    if target == 0:  # the same fine-tuning without pruning: the fair reference for the pruned levels
        stage = ["--epoch", str(config["prune_ft_epochs"]), "--pre_warm_epochs", "0", "--prune_target", "0"]
    else:
        stage = ["--epoch", "0", "--prune_target", str(target), "--prune_step", str(step),
                 "--prune_ft_epochs", str(config["prune_ft_epochs"]), "--prune_rule", "f1", "--prune_f1_tol", str(f1_tol), "--prune_mode", mode]
    return _finetune(config, train_path, out_dir, name, seed, ["--model_path", stage_b, *_stage_b_args(config), *stage])


@dataclass
class Prediction:
    """Monte Carlo class probabilities (samples, cells, classes) of a checkpoint on some cells."""

    samples: np.ndarray
    classes: list[str]

    @property
    def mean(self) -> np.ndarray:
        return self.samples.mean(axis=0)  # (cells, classes)

    def scores(self) -> dict[str, np.ndarray]:
        """Per-cell uncertainty scores, higher = less certain."""
        summary = uncertainty_summary(self.samples)
        return {"one_minus_confidence": 1.0 - summary["confidence"], "entropy": summary["entropy"],
                "mutual_info": summary["mutual_info"]}


def predict(checkpoint_path: str, data: ExpressionData, rows: np.ndarray, samples: int, seed: int) -> Prediction:
    """MC-predict the given cells with a saved checkpoint (one sample for a deterministic model)."""
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint.genes != data.genes:
        raise RuntimeError("the checkpoint's genes differ from the data's; the benchmark wrote them in one order")
    dataset = BinnedDataset(data.matrix[rows], checkpoint.bin_num)
    loader = DataLoader(dataset, batch_size=64, collate_fn=collate_batch)
    n_samples = samples if checkpoint.model.is_bayesian else 1
    return Prediction(predict_proba_samples(checkpoint.model, loader, n_samples, seed=seed), checkpoint.classes)


def evaluate(probs: np.ndarray, labels: np.ndarray, classes: list[str], scores: dict[str, np.ndarray]) -> dict:
    """Accuracy, macro-F1, ECE, NLL and the misclassification AUROC of each uncertainty score."""
    codes, _ = encode_labels(labels, classes)
    metrics = classification_metrics(probs, codes, classes)
    correct = probs.argmax(axis=1) == codes
    result = {key: metrics[key] for key in ("accuracy", "macro_f1", "ece", "nll", "brier")}
    for name, score in scores.items():
        result[f"misclf_auroc_{name}"] = misclassification_auroc(score, correct)
    return result


def entropy_scores(probs: np.ndarray) -> dict[str, np.ndarray]:
    """1 - confidence and entropy for a single probability matrix (cells, classes), e.g. logistic regression."""
    summary = uncertainty_summary(probs[None])
    return {"one_minus_confidence": 1.0 - summary["confidence"], "entropy": summary["entropy"]}
