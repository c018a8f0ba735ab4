"""Predict cell types with Bayesian uncertainty from a checkpoint of finetune_sparse.py.

load the checkpoint -> read the data and align its genes to the model's -> encode each batch once and sample the
head S times -> per-cell predictions and uncertainties -> CSV tables, an annotated .h5ad and, when the data has
labels, metrics and plots. Everything is computed before the first file is written.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure  # the object API needs no pyplot and no GUI backend
from torch.utils.data import DataLoader

from bayesian_sparse_transformer import Checkpoint, ensemble_novelty, load_ensemble, predict_samples
from utils import (
    BUNDLED_LABEL_KEY,
    BinnedDataset,
    DataOptions,
    ExpressionData,
    UserError,
    accuracy_at_coverage,
    add_data_options,
    add_run_options,
    align_genes,
    atomic_path,
    atomic_write,
    check_api_options,
    classification_metrics,
    collate_batch,
    dataset_from_anndata,
    load_dataset,
    misclassification_auroc,
    package_versions,
    pool_members,
    prepare_output_dir,
    reliability_bins,
    resolve_device,
    run_cli,
    set_seed,
    uncertainty_summary,
    with_options,
    write_json,
)

UNASSIGNED = "Unassigned"
UNASSIGN_RULES = ("novelty", "confidence", "entropy", "mutual_info")
# Default --unassign_thres per rule: novelty is relative to the checkpoints' own thresholds (1.0 = theirs);
# confidence < 0.5 is scBERT's novel-type rule.
DEFAULT_THRESHOLDS = {"novelty": 1.0, "confidence": 0.5, "entropy": 0.5, "mutual_info": 0.5}
COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)
CURVE_COVERAGES = tuple(np.round(np.linspace(0.1, 1.0, 10), 2))
OUTPUT_FILES = ("predictions.csv", "probabilities.csv", "predictions.h5ad", "metrics.json", "run.json")
# Per-cell uncertainty columns of predictions.csv and of the .h5ad's obs, by uncertainty_summary key: one naming
# (scanpy's obs convention) so a column means the same in both files.
CELL_COLUMNS = {"confidence": "pred_confidence", "entropy": "pred_entropy", "expected_entropy": "pred_expected_entropy",
                "mutual_info": "pred_mutual_info", "pred_std": "pred_std", "novelty": "pred_novelty"}
PLOT_FILES = ("reliability.png", "confusion_matrix.png", "accuracy_coverage.png", "uncertainty_hist.png", "umap.png")


def build_parser() -> argparse.ArgumentParser:
    """The command line; options shared with finetune_sparse.py keep its names and meanings."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = add_data_options(p, label_key=None, label_help="obs column with true cell types; turns on evaluation")
    data.add_argument("--cells", default=None, help="text file of cell ids (obs names), one per line: predict only these, e.g. {model_name}{fold}_val_cells.txt from training")
    data.add_argument("--allow_missing_genes", action="store_true", help="predict even when fewer than half of the model's genes are in the data (missing genes are zeros)")

    model = p.add_argument_group("model and prediction")
    model.add_argument("--model_path", required=True, help="a checkpoint of finetune_sparse.py (e.g. ckpts/finetune0_best.pth), or its run "
                       "directory (--ckpt_dir): every fold's *_best.pth is then one member of an ensemble whose probabilities are averaged")
    model.add_argument("--bayes_mc_samples", type=int, default=8, help="head samples per cell and ensemble member; 1 = the posterior means only (deterministic)")
    model.add_argument("--unassign_by", default="novelty", choices=UNASSIGN_RULES,
                       help="score deciding which cells are Unassigned: novelty (how unlike the training cells, for cell "
                            "types absent from training; checkpoints without its statistics fall back to confidence), or confidence, "
                            "entropy, mutual_info")
    model.add_argument("--unassign_thres", type=float, default=None,
                       help="novelty: Unassigned above it (default 1.0 = the threshold stored at training, --novelty_fpr of known "
                            "validation cells above it); confidence: below it (default 0.5, scBERT's rule); entropy/mutual_info: above it (default 0.5)")
    model.add_argument("--batch_size", type=int, default=32, help="cells per batch")
    model.add_argument("--seed", type=int, default=2021, help="seed of the head samples: same checkpoint + seed = same predictions")

    run = add_run_options(p, output_help="replace outputs of an earlier run in OUTPUT_DIR")
    run.add_argument("--output_dir", default="./predictions", help="directory for the outputs")
    return p


@dataclass(frozen=True)
class PredictConfig(DataOptions):
    """Every option of one prediction run, as the command line defines them (build_parser holds the defaults and
    the help); built and checked once by `make_config`, then read-only. Recorded as `args` in run.json."""

    # data (after DataOptions' fields)
    cells: str | None
    allow_missing_genes: bool
    # model and prediction
    model_path: str
    bayes_mc_samples: int
    unassign_by: str
    unassign_thres: float  # resolved by make_config: DEFAULT_THRESHOLDS[unassign_by] unless given
    batch_size: int
    seed: int
    # run
    device: str
    amp: bool
    num_workers: int
    overwrite: bool
    output_dir: str

    def as_dict(self) -> dict:
        return asdict(self)


def make_config(args: argparse.Namespace) -> PredictConfig:
    """The run's configuration from the parsed command line: the Unassigned rule's threshold resolved, checked,
    then frozen."""
    thres = DEFAULT_THRESHOLDS[args.unassign_by] if args.unassign_thres is None else args.unassign_thres
    config = PredictConfig(**(vars(args) | {"unassign_thres": thres}))
    validate_config(config)
    return config


def default_config(model_path: str | os.PathLike, **options) -> PredictConfig:
    """The command line's defaults for the model at `model_path`, with `options` by name: the Python API's config."""
    defaults = build_parser().parse_args(["--model_path", str(model_path)])
    return make_config(with_options(defaults, options, "predict_updated.py"))


def validate_config(config: PredictConfig) -> None:
    """Reject out-of-range options before anything is read."""
    checks = [
        (config.batch_size >= 1, "--batch_size must be at least 1"),
        (config.bayes_mc_samples >= 1, "--bayes_mc_samples must be at least 1 (1 = deterministic posterior means)"),
        (config.num_workers >= 0, "--num_workers must be at least 0"),
        (math.isfinite(config.unassign_thres), "--unassign_thres must be a finite number"),
    ]
    if config.unassign_by == "confidence":
        checks.append((0 <= config.unassign_thres <= 1, "--unassign_thres must be in [0, 1] with --unassign_by confidence"))
    else:
        checks.append((config.unassign_thres >= 0, f"--unassign_thres must be at least 0 with --unassign_by {config.unassign_by}"))
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    resolve_device(config.device)  # an unusable --device fails here, before any data is read


def validate_outputs(config: PredictConfig) -> None:
    """The CLI's outputs must not replace an input or an earlier run (without --overwrite)."""
    outputs = {(Path(config.output_dir) / name).resolve() for name in OUTPUT_FILES}
    for flag, path in (("--data_path", config.data_path), ("--model_path", config.model_path), ("--cells", config.cells)):
        if path is not None and Path(path).resolve() in outputs:
            raise UserError(f"{flag} {path} is one of the output files; choose another --output_dir")
    if Path(config.output_dir).exists():  # refuse early so nothing is computed in vain; created only when writing
        prepare_output_dir(config.output_dir, config.overwrite)


# --------------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------------


def load_data(config: PredictConfig, checkpoint: Checkpoint,
              adata: anndata.AnnData | None = None) -> tuple[ExpressionData, np.ndarray, str | None]:
    """The requested cells (of `adata`, else --data_path), genes in the checkpoint's order; also their row
    positions in the AnnData and the label column used."""
    options = dict(layer=config.layer, use_raw=config.use_raw, normalize=config.normalize,
                   require_labels=config.label_key is not None, gene_symbols=config.gene_symbols)
    if adata is not None:
        data = dataset_from_anndata(adata, label_key=config.label_key, **options)
    else:
        label_key = config.label_key
        if config.data_path is None and label_key is None:
            label_key = BUNDLED_LABEL_KEY  # evaluation runs out of the box on the bundled example
        data = load_dataset(config.data_path, label_key=label_key, **options)
    data, rows = select_cells(data, config.cells)
    data = align_genes(data, checkpoint.genes, allow_missing=config.allow_missing_genes)
    return data, rows, data.label_key


def select_cells(data: ExpressionData, cells_file: str | None) -> tuple[ExpressionData, np.ndarray]:
    """Keep the cells listed in `cells_file` (in data order); UserError when some ids are not in the data."""
    rows = np.arange(len(data.cell_ids))
    if cells_file is None:
        return data, rows
    try:
        wanted = [line.strip() for line in Path(cells_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --cells file {cells_file} ({err}); pass a text file with one cell id per line") from err
    if not wanted:
        raise UserError(f"--cells file {cells_file} lists no cell ids; pass a text file with one cell id per line")
    index = pd.Index(data.cell_ids)
    if not index.is_unique:
        raise UserError("the data's cell ids (obs names) are not unique, so --cells cannot pick cells; run adata.obs_names_make_unique() first")
    positions = index.get_indexer(wanted)
    unknown = [cell for cell, position in zip(wanted, positions) if position < 0]
    if unknown:
        examples = ", ".join(repr(cell) for cell in unknown[:3])
        raise UserError(f"{len(unknown)} of {len(wanted)} cell ids in {cells_file} are not in the data (e.g. {examples}); check that the file belongs to this data set")
    rows = np.unique(positions)
    labels = data.labels[rows] if data.labels is not None else None
    return replace(data, matrix=data.matrix[rows], cell_ids=[data.cell_ids[i] for i in rows], labels=labels), rows


# --------------------------------------------------------------------------------------------------------------
# Predict and summarise
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """Per-cell results: `summary` holds utils.uncertainty_summary's arrays (mean_probs (cells, classes), ...)."""

    cell_ids: list[str]
    classes: list[str]
    summary: dict[str, np.ndarray]
    unassigned: np.ndarray  # (cells,) bool
    true_labels: np.ndarray | None  # (cells,) str, may include types the model never saw
    seconds: float  # inference time
    rule: tuple[str, float] = ("confidence", 0.5)  # the Unassigned rule applied: score and threshold

    @property
    def top_label(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.summary["pred"]]

    @property
    def pred_label(self) -> np.ndarray:
        return np.where(self.unassigned, UNASSIGNED, self.top_label)

    def scores(self) -> dict[str, np.ndarray]:
        """Uncertainty scores, higher = less sure, used to rank cells for error and novel-type detection."""
        s = self.summary
        scores = {"1-confidence": 1 - s["confidence"], "entropy": s["entropy"], "mutual_info": s["mutual_info"],
                  "pred_std": s["pred_std"]}
        if np.isfinite(s["novelty"]).all():  # NaN: checkpoints without novelty statistics
            scores["novelty"] = s["novelty"]
        return scores

    def label_codes(self) -> np.ndarray:
        """True labels as class indices, -1 for types the model never saw."""
        return pd.Index(self.classes).get_indexer(self.true_labels)


def predict(members: list[Checkpoint], data: ExpressionData, config: PredictConfig) -> Prediction:
    """Encode each batch once per member, sample its head S times with noise drawn once from --seed, summarise.

    An ensemble's K members contribute S samples each: (K*S, cells, classes). The predicted probabilities pool
    the members' posterior means geometrically (`pool_members`); mutual information counts the disagreement of
    all K*S samples, members included. Novelty is each member's score divided by its own threshold, averaged
    over members that did not train on the cell (see `ensemble_novelty`): 1.0 is the threshold.
    """
    set_seed(config.seed)
    device = resolve_device(config.device)
    first = members[0]
    if not first.model.is_bayesian and config.bayes_mc_samples > 1:
        warnings.warn(f"the checkpoint's head is deterministic (stage {first.stage}): the {config.bayes_mc_samples} "
                      "samples of a model agree; use a Stage B (--bayes_head) checkpoint for Bayesian uncertainty",
                      stacklevel=2)
    loader = DataLoader(BinnedDataset(data.matrix, first.bin_num, bin_width=first.bin_width), batch_size=config.batch_size,
                        collate_fn=collate_batch, num_workers=config.num_workers)
    started = time.perf_counter()
    has_novelty = all(member.novelty is not None for member in members)
    samples, novelty = [], []
    for index, member in enumerate(members):
        model = member.model.to(device)
        model.set_deterministic(config.bayes_mc_samples == 1)
        probs, member_novelty = predict_samples(model, loader, config.bayes_mc_samples, seed=config.seed + index,
                                          novelty=member.novelty if has_novelty else None, device=device, amp=config.amp,
                                          progress=sys.stderr.isatty())
        samples.append(probs)
        novelty.append(member_novelty)
    seconds = time.perf_counter() - started
    summary = uncertainty_summary(np.concatenate(samples), pool_members([np.asarray(s, dtype=np.float64).mean(axis=0) for s in samples]))
    if has_novelty:
        trained = None if any(n.trained is None for n in novelty) else np.stack([n.trained for n in novelty])
        summary["novelty"] = ensemble_novelty([n.score for n in novelty], [m.novelty["threshold"] for m in members], trained)
        summary["novelty_pvalues"] = view_pvalues([n.evidence for n in novelty], trained)
    else:
        summary["novelty"] = np.full(len(data.cell_ids), np.nan)
    rule = unassign_rule(config, has_novelty)
    unassigned = unassigned_cells(summary, *rule)
    return Prediction(data.cell_ids, first.classes, summary, unassigned, data.labels, seconds, rule)


def view_pvalues(evidence: list[dict[str, np.ndarray] | None], trained: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each novelty view's p-value (cells,) under "a known type", for the ensemble: the geometric mean of the
    members' p-values, over the members that did not train on the cell (as the novelty score). Empty when a
    member's statistics predate the views or the members combine different views."""
    if any(e is None for e in evidence) or len({tuple(e) for e in evidence}) > 1:
        return {}
    return {view: np.exp(-ensemble_novelty([e[view] for e in evidence], [1.0] * len(evidence), trained))
            for view in evidence[0]}


def unassign_rule(config: PredictConfig, has_novelty: bool) -> tuple[str, float]:
    """--unassign_by and its threshold; scBERT's confidence < 0.5 when novelty is asked of checkpoints without it."""
    if config.unassign_by == "novelty" and not has_novelty:
        warnings.warn("the checkpoint has no novelty statistics (trained before they existed): Unassigned means "
                      "confidence < 0.5 instead; retrain, or pass --unassign_by confidence to silence this", stacklevel=3)
        return "confidence", DEFAULT_THRESHOLDS["confidence"]
    return config.unassign_by, config.unassign_thres


def unassigned_cells(summary: dict[str, np.ndarray], rule: str, threshold: float) -> np.ndarray:
    """Cells too uncertain to name: confidence below the threshold (scBERT's rule), or novelty/entropy/MI above it."""
    if rule == "confidence":
        return summary["confidence"] < threshold
    return summary[rule] > threshold


def evaluate(pred: Prediction) -> dict:
    """Metrics over cells whose label the model knows; AUROCs for flagging errors and, if any, unseen types."""
    codes = pred.label_codes()
    known = codes >= 0
    scores = pred.scores()
    unseen, unseen_counts = np.unique(pred.true_labels[~known], return_counts=True)
    metrics: dict = {"n_cells_predicted": len(codes), "n_unseen_label_cells": int((~known).sum()),
                     "unseen_labels": dict(zip(unseen.tolist(), unseen_counts.tolist())),
                     "unassigned_share": float(pred.unassigned.mean())}
    if not known.all():
        # The novel-type case: how many unseen-type cells were left Unassigned, and how well each score ranks
        # them above cells of known types (NaN when every cell is of an unseen type).
        metrics["unseen_unassigned_share"] = float(pred.unassigned[~known].mean())
        metrics["known_unassigned_share"] = float(pred.unassigned[known].mean()) if known.any() else float("nan")
        metrics["unseen_type_auroc"] = {name: misclassification_auroc(s, known) for name, s in scores.items()}
    if not known.any():
        return metrics
    metrics.update(classification_metrics(pred.summary["mean_probs"][known], codes[known], pred.classes))
    correct = pred.summary["pred"][known] == codes[known]
    metrics["misclassification_auroc"] = {name: misclassification_auroc(s[known], correct) for name, s in scores.items()}
    metrics["accuracy_at_coverage"] = {name: accuracy_at_coverage(s[known], correct, COVERAGES) for name, s in scores.items()}
    assigned = ~pred.unassigned[known]
    metrics["accuracy_of_assigned"] = float(correct[assigned].mean()) if assigned.any() else float("nan")
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Plots (rendered to PNG bytes, written with the other outputs)
# --------------------------------------------------------------------------------------------------------------


def png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes, so plots exist before any file is written."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def reliability_figure(probs: np.ndarray, codes: np.ndarray, ece: float) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    bins = reliability_bins(probs, codes, n_bins=15)
    edges = bins["edges"]
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.bar(edges[:-1], np.nan_to_num(bins["accuracy"]), width=np.diff(edges), align="edge", edgecolor="black",
           alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    return fig


def confusion_figure(matrix: np.ndarray, classes: list[str]) -> Figure:
    """Row-normalised confusion matrix: each row shows where the cells of one true type went."""
    totals = matrix.sum(axis=1, keepdims=True)
    normalized = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)  # rows: true classes
    size = 2.5 + 0.5 * len(classes)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=60, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised)")
    for i, j in np.ndindex(matrix.shape):
        if matrix[i, j]:
            ax.text(j, i, f"{normalized[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if normalized[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig


def coverage_figure(scores: dict[str, np.ndarray], correct: np.ndarray) -> Figure:
    """Accuracy on the most certain cells as fewer are kept, one line per uncertainty score."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for name, score in scores.items():
        accuracy = accuracy_at_coverage(score, correct, CURVE_COVERAGES)
        ax.plot(CURVE_COVERAGES, list(accuracy.values()), marker="o", label=name)
    ax.set(xlabel="coverage (share of most certain cells kept)", ylabel="accuracy", title="Accuracy vs coverage")
    ax.invert_xaxis()
    ax.legend()
    return fig


def uncertainty_histogram_figure(scores: dict[str, np.ndarray], correct: np.ndarray) -> Figure:
    """Entropy and mutual information of correct vs wrong cells: good scores separate the two."""
    fig = Figure(figsize=(9, 3.5))
    for ax, name in zip(fig.subplots(1, 2), ("entropy", "mutual_info")):
        bins = np.linspace(0, max(float(scores[name].max()), 1e-6), 31)
        for mask, label in ((correct, "correct"), (~correct, "wrong")):
            if mask.any():
                ax.hist(scores[name][mask], bins=bins, alpha=0.6, density=True, label=f"{label} ({int(mask.sum())})")
        ax.set(xlabel=name, ylabel="density", title=f"{name} of correct vs wrong cells")
        ax.legend()
    return fig


def umap_figure(coords: np.ndarray, labels: np.ndarray, entropy: np.ndarray) -> Figure:
    """The data's own UMAP coloured by predicted label and by predictive entropy."""
    fig = Figure(figsize=(14, 5), layout="constrained")  # constrained layout keeps the outside legend visible
    by_label, by_entropy = fig.subplots(1, 2)
    palette = [color for i, color in enumerate(colormaps["tab20"].colors) if i not in (14, 15)]  # greys: Unassigned
    for i, name in enumerate(sorted(set(labels) - {UNASSIGNED})):
        mask = labels == name
        by_label.scatter(*coords[mask].T, s=6, color=palette[i % len(palette)], label=name)
    if (labels == UNASSIGNED).any():
        by_label.scatter(*coords[labels == UNASSIGNED].T, s=6, color="lightgrey", label=UNASSIGNED)
    by_label.set(title="UMAP: predicted label", xticks=[], yticks=[])
    by_label.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=2, fontsize=8, frameon=False)
    points = by_entropy.scatter(*coords.T, s=6, c=entropy, cmap="viridis")
    by_entropy.set(title="UMAP: predictive entropy", xticks=[], yticks=[])
    fig.colorbar(points, ax=by_entropy, label="entropy (nats)")
    return fig


def make_plots(pred: Prediction, metrics: dict | None, umap: np.ndarray | None) -> dict[str, bytes]:
    """PNG files by name: evaluation plots when labels are known, a UMAP when the data has one."""
    plots = {}
    if metrics is not None and "accuracy" in metrics:
        codes = pred.label_codes()
        known = codes >= 0
        probs = pred.summary["mean_probs"][known]
        correct = pred.summary["pred"][known] == codes[known]
        scores = {name: s[known] for name, s in pred.scores().items()}
        plots["reliability.png"] = png(reliability_figure(probs, codes[known], metrics["ece"]))
        plots["confusion_matrix.png"] = png(confusion_figure(np.array(metrics["confusion_matrix"]), pred.classes))
        plots["accuracy_coverage.png"] = png(coverage_figure(scores, correct))
        plots["uncertainty_hist.png"] = png(uncertainty_histogram_figure(scores, correct))
    if umap is not None:
        plots["umap.png"] = png(umap_figure(umap, pred.pred_label, pred.summary["entropy"]))
    return plots


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


def predictions_table(pred: Prediction) -> pd.DataFrame:
    """One row per cell: label, Unassigned flag, uncertainties, the most probable class and the true label."""
    table = pd.DataFrame({
        "cell_id": pred.cell_ids, "pred_label": pred.pred_label, "pred_unassigned": pred.unassigned,
        **{column: pred.summary[key] for key, column in CELL_COLUMNS.items()}, "top_label": pred.top_label,
    })
    for view, pvalues in pred.summary.get("novelty_pvalues", {}).items():
        table[f"novelty_p_{view}"] = pvalues
    if pred.true_labels is not None:
        table["true_label"] = pred.true_labels
    return table


def probabilities_table(pred: Prediction) -> pd.DataFrame:
    """Mean class probabilities over the head samples, cells x classes."""
    table = pd.DataFrame(pred.summary["mean_probs"], columns=pred.classes)
    table.insert(0, "cell_id", pred.cell_ids)
    return table


def annotated_anndata(adata: anndata.AnnData, rows: np.ndarray, pred: Prediction, metadata: dict) -> anndata.AnnData:
    """A copy of the predicted cells with results where scanpy users look: obs, obsm and uns."""
    out = adata[rows].copy()
    s = pred.summary
    out.obs["pred_label"] = pd.Categorical(pred.pred_label, categories=[*pred.classes, UNASSIGNED])
    for key, column in CELL_COLUMNS.items():
        out.obs[column] = s[key]
    out.obs["pred_unassigned"] = pred.unassigned
    out.obsm["pred_probabilities"] = s["mean_probs"].astype(np.float32)  # (cells, classes)
    if s.get("novelty_pvalues"):  # which view makes a cell novel: one column per view
        out.obsm["pred_novelty_pvalues"] = pd.DataFrame(s["novelty_pvalues"], index=out.obs_names)
    out.uns["pred_classes"] = np.asarray(pred.classes, dtype=str)
    out.uns["prediction"] = metadata
    return out


def write_h5ad_atomic(adata: anndata.AnnData, path: Path) -> None:
    """anndata writes only to a path, so write a hidden file next to `path` and rename it into place.

    h5py's errors (disk full) arrive as OSError, which atomic_path turns into a one-line error naming `path`.
    """
    with atomic_path(path) as temp:
        adata.write_h5ad(temp)


def write_outputs(directory: Path, tables: dict[str, pd.DataFrame], adata: anndata.AnnData,
                  plots: dict[str, bytes], jsons: dict[str, dict]) -> None:
    """Each file atomically; the .h5ad first (the likeliest to fail), run.json last (it marks a complete run)."""
    directory = prepare_output_dir(directory, overwrite=True)  # emptiness was checked in validate_outputs
    # With --overwrite, outputs this run does not produce (e.g. metrics of an earlier labelled run) would
    # contradict the new ones: remove them.
    for name in (*OUTPUT_FILES, *PLOT_FILES):
        if name not in {"predictions.h5ad", *tables, *plots, *jsons}:
            (directory / name).unlink(missing_ok=True)
    write_h5ad_atomic(adata, directory / "predictions.h5ad")
    for name, table in tables.items():
        with atomic_write(directory / name) as handle:
            table.to_csv(handle, index=False)
    for name, content in plots.items():
        with atomic_write(directory / name, "wb") as handle:
            handle.write(content)
    for name, content in jsons.items():
        write_json(directory / name, content)


def report(metrics: dict | None, pred: Prediction, label_key: str | None) -> None:
    """A few lines for the terminal; metrics.json has everything."""
    name, threshold = pred.rule
    rule = f"{name} {'<' if name == 'confidence' else '>'} {threshold:g}"
    print(f"unassigned ({rule}): {pred.unassigned.mean():.1%} of {len(pred.cell_ids)} cells")
    if metrics is None:
        return
    if metrics["n_unseen_label_cells"]:
        names = ", ".join(f"{k!r} ({v})" for k, v in metrics["unseen_labels"].items())
        print(f"{metrics['n_unseen_label_cells']} cells have labels the model never saw: {names}")
        best = max(metrics.get("unseen_type_auroc", {}).items(), key=lambda kv: np.nan_to_num(kv[1]), default=None)
        if best:
            print(f"flagging unseen-type cells: best AUROC {best[1]:.3f} ({best[0]})")
    if "accuracy" not in metrics:
        return
    print(f"evaluated {metrics['n_cells']} cells against obs[{label_key!r}]: accuracy {metrics['accuracy']:.4f}, "
          f"macro-F1 {metrics['macro_f1']:.4f}, ECE {metrics['ece']:.4f}, NLL {metrics['nll']:.4f}")
    name, value = max(metrics["misclassification_auroc"].items(), key=lambda kv: np.nan_to_num(kv[1]))
    print(f"flagging misclassified cells: best AUROC {value:.3f} ({name})")


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def run_summary(pred: Prediction, metrics: dict | None, label_key: str | None, seconds: float) -> dict:
    """The headline numbers for run.json."""
    summary = {"n_cells": len(pred.cell_ids), "n_classes": len(pred.classes), "label_key": label_key,
               "unassigned_share": float(pred.unassigned.mean()), "seconds": seconds,
               "inference_seconds": pred.seconds, "cells_per_second": len(pred.cell_ids) / max(pred.seconds, 1e-9)}
    if metrics is not None and "accuracy" in metrics:
        summary.update({key: metrics[key] for key in ("accuracy", "macro_f1", "ece", "nll")})
    return summary


@dataclass
class Annotation:
    """Everything one prediction run produced, before anything is written."""

    adata: anndata.AnnData  # the predicted cells with obs/obsm/uns results (a copy)
    prediction: Prediction
    metrics: dict | None
    members: list[Checkpoint]
    rows: np.ndarray  # positions of the predicted cells in the input AnnData
    label_key: str | None


def annotate_with(config: PredictConfig, adata: anndata.AnnData | None = None) -> Annotation:
    """load the model -> read and align the data -> predict -> evaluate; the CLI and `annotate` share it."""
    members = load_ensemble(config.model_path)
    checkpoint = members[0]
    data, rows, label_key = load_data(config, checkpoint, adata)
    pred = predict(members, data, config)
    metrics = evaluate(pred) if pred.true_labels is not None else None
    metadata = {"model_path": str(config.model_path), "checkpoint_stage": checkpoint.stage, "ensemble_size": len(members),
                "bayes_mc_samples": config.bayes_mc_samples, "seed": config.seed, "unassign_by": pred.rule[0],
                "unassign_thres": pred.rule[1], "versions": package_versions()}
    if metrics is not None and "accuracy" in metrics:
        metadata["metrics"] = {key: metrics[key] for key in ("accuracy", "macro_f1", "ece", "nll")}
    return Annotation(annotated_anndata(data.adata, rows, pred, metadata), pred, metrics, members, rows, label_key)


def annotate(adata: anndata.AnnData, model: str | os.PathLike, **options) -> anndata.AnnData:
    """Annotate an in-memory AnnData, as `predict_updated.py` does a file: returns a copy of it with the same
    `obs` columns (pred_label, pred_confidence, pred_entropy, ...), `obsm['pred_probabilities']` and
    `uns['prediction']` (with `uns['prediction']['metrics']` when `label_key` names true types).

    `model` is a checkpoint file or a run directory (an ensemble); `options` are the CLI's options by name, e.g.
    `annotate(adata, "runs/demo/stageB2", bayes_mc_samples=8, gene_symbols="feature_name", label_key="cell_type")`.
    """
    check_api_options("annotate", options, (f.name for f in fields(PredictConfig)),
                      {"model_path", "data_path", "output_dir", "overwrite", "cells"}, "predict_updated.py")
    return annotate_with(default_config(model, **options), adata).adata


def run(config: PredictConfig) -> dict:
    """parse -> validate -> load -> predict -> summarise -> write; returns the run summary."""
    started = time.perf_counter()
    validate_outputs(config)
    result = annotate_with(config)
    pred, metrics, label_key = result.prediction, result.metrics, result.label_key
    checkpoint = result.members[0]
    report(metrics, pred, label_key)
    adata = result.adata
    umap = np.asarray(adata.obsm["X_umap"])[:, :2] if "X_umap" in adata.obsm else None
    plots = make_plots(pred, metrics, umap)
    summary = run_summary(pred, metrics, label_key, seconds=time.perf_counter() - started)
    versions = adata.uns["prediction"]["versions"]
    jsons = {"metrics.json": metrics} if metrics is not None else {}
    jsons["run.json"] = {"args": config.as_dict(), "versions": versions, "checkpoint_versions": checkpoint.versions,
                         "summary": summary}
    tables = {"predictions.csv": predictions_table(pred), "probabilities.csv": probabilities_table(pred)}
    write_outputs(Path(config.output_dir), tables, adata, plots, jsons)
    print(f"done: {summary['n_cells']} cells in {time.perf_counter() - started:.1f} s (inference {pred.seconds:.1f} s, "
          f"{summary['cells_per_second']:.0f} cells/s), {summary['unassigned_share']:.1%} unassigned -> {config.output_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line message for problems the user can fix)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(make_config(args)))


if __name__ == "__main__":
    sys.exit(main())
