"""Predict cell types with Bayesian uncertainty from a checkpoint of finetune_sparse.py.

load the checkpoint -> read the data a chunk of cells at a time and align its genes to the model's -> encode each
batch once and sample the head S times -> per-cell predictions and uncertainties (and, with --majority_voting,
each cluster's majority label) -> CSV tables, an annotated .h5ad and, when the data has labels, metrics and plots.

An .h5ad file is read backed, --chunk_size cells at a time, so memory grows with the per-cell results only (about
1 kB per cell), not with the expression matrix: predictions.csv and probabilities.csv grow a chunk at a time,
and predictions.h5ad holds the cells' obs, var and obsm with the results but no expression matrix (X is None;
it stays in the input file). Leiden over-clustering for --majority_voting needs every cell's expression at once
and reads the file whole; so does a --layer, which anndata loads whole even from a backed file. Outputs go to a
hidden directory that replaces --output_dir as a whole at the end: a failed or killed run leaves the earlier
outputs. In Python, `annotate(adata, model)` returns the same results as an `AnnotationResult`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure  # the object API needs no pyplot and no GUI backend
from torch.utils.data import DataLoader

import allocator
import options
from annotation import DEFAULT_KEY, UNCERTAINTY_COLUMNS, AnnotationResult, cell_table
from bayesian_sparse_transformer import predict_samples
from checkpoints import Checkpoint, load_ensemble
from directory_lock import LOCK_NAME, locked, staged_replacement
from majority_voting import clusters_from_column, leiden_over_clustering, majority_vote
from novelty import ensemble_novelty
from options import DEFAULT_THRESHOLDS, PredictConfig
from progress import progress
from run_manifest import ensemble_temperature
from streaming import CsvAppender, aligned_chunks, chunk_cells, first_rows, read_blocks, subset
from utils import (
    ALL_CELLS,
    UNASSIGNED,
    BinnedDataset,
    ExpressionData,
    Input,
    UserError,
    accuracy_at_coverage,
    atomic_write,
    call_weights,
    cell_reader,
    check_class_names,
    classification_metrics,
    collate_batch,
    load_dataset,
    misclassification_auroc,
    package_versions,
    pool_members,
    read_input,
    reliability_bins,
    resolve_device,
    run_cli,
    set_seed,
    tempered,
    uncertainty_summary,
    write_h5ad,
    write_json,
)

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)
CURVE_COVERAGES = tuple(np.round(np.linspace(0.1, 1.0, 10), 2))
CSV_FILES = ("predictions.csv", "probabilities.csv")
OUTPUT_FILES = (*CSV_FILES, "predictions.h5ad", "metrics.json", "run.json")
# Per-cell uncertainty columns under the default key, by uncertainty_summary key (annotation.cell_table makes every
# column; predictions.csv, the .h5ad's obs and AnnotationResult.predicted_labels share its names).
CELL_COLUMNS = {key: f"{DEFAULT_KEY}_{name}" for key, name in UNCERTAINTY_COLUMNS.items()}
PLOT_FILES = ("reliability.png", "confusion_matrix.png", "accuracy_coverage.png", "uncertainty_hist.png", "umap.png")
UMAP_MAX_CELLS = 50_000  # a random sample of larger data sets is drawn: more points only take minutes to draw


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from PredictConfig's fields (options shared with finetune_sparse.py keep its
    names and meanings)."""
    return options.build_parser(PredictConfig, __doc__)


def default_config(model_path: str | os.PathLike, **given) -> PredictConfig:
    """The configuration for the model at `model_path` with `given` options by name: the Python API's config,
    converted and checked exactly as the command line's."""
    return options.make(PredictConfig, {"model_path": os.fspath(model_path), **given})


def validate_outputs(config: PredictConfig) -> None:
    """The CLI's outputs must not replace an input, an earlier run (without --overwrite) or anything else.

    --overwrite swaps the whole directory for the new outputs, so it may hold only an earlier run's outputs.
    """
    directory = Path(config.output_dir)
    outputs = {(directory / name).resolve() for name in OUTPUT_FILES}
    for flag, path in (("--data_path", config.data_path), ("--model_path", config.model_path), ("--cells", config.cells)):
        if path is not None and Path(path).resolve() in outputs:
            raise UserError(f"{flag} {path} is one of the output files; choose another --output_dir")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"output path {directory} is an existing file; choose a directory path for --output_dir")
    present = sorted(path.name for path in directory.iterdir()
                     if path.name != LOCK_NAME and not path.name.startswith(".tmp-")) if directory.is_dir() else []
    if present and not config.overwrite:
        raise UserError(f"output directory {directory} is not empty; pass --overwrite to replace its outputs, or choose "
                        "another --output_dir")
    foreign = [name for name in present if name not in {*OUTPUT_FILES, *PLOT_FILES}]
    if foreign:
        raise UserError(f"--overwrite replaces {directory} as a whole, but it also holds {', '.join(foreign[:3])}"
                        f"{' ...' if len(foreign) > 3 else ''}, which are not prediction outputs; choose another --output_dir")


def check_input(config: PredictConfig) -> None:
    """Read and check --data_path as prediction will (before a pipeline trains for hours on a file it cannot use)."""
    load_dataset(config.data_path, label_key=config.label_key, layer=config.layer, use_raw=config.use_raw,
                 normalize=config.normalize, require_labels=config.label_key is not None, gene_symbols=config.gene_symbols)


def check_model_flags(config: PredictConfig, checkpoint: Checkpoint) -> None:
    """scBERT's --gene_num, --bin_num and --pos_embed: the model fixes them, so given ones must agree with it."""
    has_embedding = checkpoint.model.config.encoder.gene_embedding != "none"
    fixed = {"gene_num": len(checkpoint.genes), "bin_num": checkpoint.bin_num, "pos_embed": has_embedding}
    for name, value in fixed.items():
        given = getattr(config, name)
        if given is not None and given != value:
            raise UserError(f"--{name} {given} contradicts the model, which has {name} {value}; drop --{name} (the "
                            "model fixes it)")


# --------------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------------


def selected_rows(cell_ids: pd.Index, cells_file: str | None) -> np.ndarray:
    """Positions of the cells to predict, in data order: those listed in `cells_file`, else all; UserError when
    some listed ids are not in the data."""
    if cells_file is None:
        return np.arange(len(cell_ids))
    try:
        wanted = [line.strip() for line in Path(cells_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --cells file {cells_file} ({err}); pass a text file with one cell id per line") from err
    if not wanted:
        raise UserError(f"--cells file {cells_file} lists no cell ids; pass a text file with one cell id per line")
    index = pd.Index([str(cell) for cell in cell_ids])
    if not index.is_unique:
        raise UserError("the data's cell ids (obs names) are not unique, so --cells cannot pick cells; run adata.obs_names_make_unique() first")
    positions = index.get_indexer(wanted)
    unknown = [cell for cell, position in zip(wanted, positions) if position < 0]
    if unknown:
        examples = ", ".join(repr(cell) for cell in unknown[:3])
        raise UserError(f"{len(unknown)} of {len(wanted)} cell ids in {cells_file} are not in the data (e.g. {examples}); check that the file belongs to this data set")
    return np.unique(positions)


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
    voting: pd.DataFrame | None = None  # majority_voting.majority_vote's table (cells,) with --majority_voting

    @property
    def top_label(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.summary["pred"]]

    @property
    def pred_label(self) -> np.ndarray:
        return np.where(self.unassigned, UNASSIGNED, self.top_label)

    def table(self, key_added: str = DEFAULT_KEY) -> pd.DataFrame:
        """The per-cell table every output shares (annotation.cell_table), indexed by cell id."""
        return cell_table(self.cell_ids, self.classes, self.summary, self.unassigned, self.voting, key_added)

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


def predict(members: list[Checkpoint], chunks: Iterable[ExpressionData], n_cells: int, config: PredictConfig,
            temperature: float = 1.0, on_chunk: Callable[[Prediction], None] | None = None) -> Prediction:
    """Predict and summarise each chunk of cells before the next (see `summarise`); `on_chunk` gets each chunk's
    Prediction when it is made. The Monte Carlo samples exist for one chunk at a time; the result joins the
    chunks' per-cell summaries, equal to one chunk of all cells (the head noise is drawn once per member from
    --seed, the same for every chunk).
    """
    set_seed(config.seed)
    device = resolve_device(config.device)
    first = members[0]
    chunks = read_first(chunks)
    if not first.model.is_bayesian and config.bayes_mc_samples > 1:
        warnings.warn(f"the checkpoint's head is deterministic (stage {first.stage}): the {config.bayes_mc_samples} "
                      "samples of a model agree; use a Stage B (--bayes_head) checkpoint for Bayesian uncertainty",
                      stacklevel=2)
    has_novelty = all(member.novelty is not None for member in members)
    rule = unassign_rule(config, has_novelty)
    for member in members:
        member.model.to(device).set_deterministic(config.bayes_mc_samples == 1)
    allocator.reuse_freed_memory()  # each batch's activations on the previous batch's pages (see allocator)
    started = time.perf_counter()
    results = CellResults(n_cells)
    # One report for all chunks and members: a bar in a terminal or notebook, a line every 10 s (cells/s, time
    # left) in a log; none with verbose=False.
    with progress(n_cells * len(members), desc="predicting", unit="cells", enabled=config.verbose) as bar:
        for number, chunk in enumerate(chunks, 1):
            summary = compact(summarise(members, chunk, config, temperature, has_novelty, device, bar, number))
            part = Prediction(chunk.cell_ids, first.classes, summary, unassigned_cells(summary, *rule), chunk.labels,
                              0.0, rule)
            if on_chunk is not None:
                on_chunk(part)
            results.add(part)
            del summary, part  # the chunk's own arrays go now, so the trim below returns their pages
            allocator.release_free_memory()
    return results.prediction(seconds=time.perf_counter() - started)


def read_first(chunks: Iterable[ExpressionData]) -> Iterator[ExpressionData]:
    """`chunks` with the first one read and checked now, before any notice about the model, so bad data stays a
    one-line error; no reference to it outlives its turn (a chunk held to the end is memory for nothing)."""
    chunks = iter(chunks)
    first = next(chunks, None)
    return chunks if first is None else itertools.chain([first], chunks)


def summarise(members: list[Checkpoint], data: ExpressionData, config: PredictConfig, temperature: float,
              has_novelty: bool, device, bar, number: int) -> dict[str, np.ndarray]:
    """One chunk's per-cell summary: encode each batch once per member, sample its head S times, summarise.

    An ensemble's K members contribute S samples each: (K*S, cells, classes). The predicted probabilities pool
    the members' posterior means geometrically (`pool_members`); mutual information counts the disagreement of
    all K*S samples, members included; `temperature` (the run's, fitted to out-of-fold predictions) then divides
    the pooled log-probabilities. Novelty is each member's score divided by its own threshold, averaged
    over members that did not train on the cell (see `ensemble_novelty`): 1.0 is the threshold.
    """
    loader = DataLoader(BinnedDataset(data.matrix, members[0].binning), batch_size=config.batch_size,
                        collate_fn=collate_batch, num_workers=config.num_workers)
    samples, novelty = [], []
    for index, member in enumerate(members):
        models = f", model {index + 1}/{len(members)}" if len(members) > 1 else ""
        bar.set_description(f"predicting (chunk {number}{models})")
        probs, member_novelty = predict_samples(member.model, counting(loader, bar), config.bayes_mc_samples,
                                                seed=config.seed + index, novelty=member.novelty if has_novelty else None,
                                                device=device, amp=config.amp, cells=len(data.cell_ids))
        samples.append(probs)  # (S, cells, classes)
        novelty.append(member_novelty)
    pooled = pool_members([np.asarray(s, dtype=np.float64).mean(axis=0) for s in samples])
    if temperature != 1.0:  # tempering renormalises: without a temperature the pooled mean is kept exactly
        pooled = tempered(pooled[None], temperature)[0]
    summary = uncertainty_summary(np.concatenate(samples), pooled, member_call_weights(members, config.call_balance))
    if has_novelty:
        trained = None if any(n.trained is None for n in novelty) else np.stack([n.trained for n in novelty])
        summary["novelty"] = ensemble_novelty([n.score for n in novelty], [m.novelty["threshold"] for m in members], trained)
        summary["novelty_pvalues"] = view_pvalues([n.evidence for n in novelty], trained)
    else:
        summary["novelty"] = np.full(len(data.cell_ids), np.nan)
    return summary


def member_call_weights(members: list[Checkpoint], balance: float) -> np.ndarray | None:
    """`utils.call_weights` from the training cells of all members (a cross-fitted ensemble's folds see every
    training cell four times out of five, so the shares are those of the training set); None when a member
    predates stored class counts."""
    if any(member.class_counts is None for member in members):
        return None
    return call_weights(np.sum([member.class_counts for member in members], axis=0), balance)


def compact(summary: dict) -> dict:
    """A summary's floats as float32 and its integers as int32, the precision every output keeps: half the memory
    of float64 for an atlas's per-cell results, and the same values whatever the chunking."""
    def narrow(values: np.ndarray) -> np.ndarray:
        kind = values.dtype.kind
        return values.astype(np.float32 if kind == "f" else np.int32) if kind in "fiu" else values

    return {key: ({view: narrow(v) for view, v in value.items()} if isinstance(value, dict) else narrow(value))
            for key, value in summary.items()}


class CellResults:
    """Every chunk's per-cell results, copied into arrays allocated once for all cells.

    Why not a list of chunks joined at the end: each chunk's results then sat between the next chunks' short-lived
    arrays and fragmented the heap, and the join copied them all once more, so memory grew by more than the
    results themselves with the number of cells.
    """

    def __init__(self, cells: int):
        self.cells, self.filled = cells, 0
        self.cell_ids: list[str] = []
        self.arrays: dict[tuple[str, ...], np.ndarray] = {}  # ("pred",), ("novelty_pvalues", view), ...
        self.first: Prediction | None = None  # the first chunk without its per-cell data: classes, rule, nested keys

    def add(self, part: Prediction) -> None:
        fields = dict(_flat(part.summary)) | {("unassigned",): part.unassigned}
        if part.true_labels is not None:
            fields[("true_labels",)] = np.asarray(part.true_labels, dtype=object)
        if self.first is None:
            nested = {key: {} for key, value in part.summary.items() if isinstance(value, dict)}
            self.first = Prediction([], part.classes, nested, np.zeros(0, dtype=bool), None, 0.0, part.rule)
            self.arrays = {key: np.empty((self.cells, *values.shape[1:]), dtype=values.dtype)
                           for key, values in fields.items()}
        start, stop = self.filled, self.filled + len(part.cell_ids)
        if stop > self.cells:
            raise RuntimeError(f"chunks hold more than the {self.cells} cells announced")  # a bug, not the user's
        for key, values in fields.items():
            self.arrays[key][start:stop] = values
        self.cell_ids.extend(part.cell_ids)
        self.filled = stop

    def prediction(self, seconds: float) -> Prediction:
        if self.first is None:
            raise RuntimeError("no chunk was predicted")
        arrays = {key: values[: self.filled] for key, values in self.arrays.items()}
        summary: dict = {key: {} for key in self.first.summary}  # an empty dict (no p-value views) stays one
        for key, values in arrays.items():
            if key[0] not in ("unassigned", "true_labels"):
                _nest(summary, key, values)
        return Prediction(self.cell_ids, self.first.classes, summary, arrays[("unassigned",)],
                          arrays.get(("true_labels",)), seconds, self.first.rule)


def _flat(summary: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    for key, value in summary.items():
        if isinstance(value, dict):
            yield from _flat(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _nest(summary: dict, key: tuple[str, ...], values: np.ndarray) -> None:
    for name in key[:-1]:
        summary = summary.setdefault(name, {})
    summary[key[-1]] = values


def counting(batches: Iterable, bar) -> Iterator:
    """The batches of `batches`, counting each one's cells on `bar` once it has been used."""
    for batch in batches:
        yield batch
        bar.update(len(batch[0]))


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
    return config.unassign_by, config.threshold


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
    metrics.update(classification_metrics(pred.summary["mean_probs"][known], codes[known], pred.classes,
                                          pred.summary["pred"][known]))
    correct = pred.summary["pred"][known] == codes[known]
    metrics["misclassification_auroc"] = {name: misclassification_auroc(s[known], correct) for name, s in scores.items()}
    metrics["accuracy_at_coverage"] = {name: accuracy_at_coverage(s[known], correct, COVERAGES) for name, s in scores.items()}
    assigned = ~pred.unassigned[known]
    metrics["accuracy_of_assigned"] = float(correct[assigned].mean()) if assigned.any() else float("nan")
    if pred.voting is not None:  # the cluster's label instead of the cell's own (an Unassigned majority is wrong)
        majority = pred.voting["majority_label"].to_numpy(dtype=object)[known]
        right, named = majority == pred.true_labels[known], majority != UNASSIGNED
        metrics["majority_voting"] = {"accuracy": float(right.mean()), "unassigned_share": float((~named).mean()),
                                      "accuracy_of_assigned": float(right[named].mean()) if named.any() else float("nan")}
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
    """PNG files by name: evaluation plots when labels are known, a UMAP when the data has one (of a random
    UMAP_MAX_CELLS cells of larger data)."""
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
        shown = np.arange(len(umap))
        if len(shown) > UMAP_MAX_CELLS:
            shown = np.sort(np.random.default_rng(0).choice(len(shown), UMAP_MAX_CELLS, replace=False))
        plots["umap.png"] = png(umap_figure(umap[shown], pred.pred_label[shown], pred.summary["entropy"][shown]))
    return plots


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


def output_tables(pred: Prediction, key_added: str) -> dict[str, pd.DataFrame]:
    """The rows of predictions.csv and probabilities.csv for the cells of `pred` (a chunk, or all cells)."""
    predictions = pred.table(key_added).rename_axis("cell_id").reset_index()
    if pred.true_labels is not None:
        predictions["true_label"] = pred.true_labels
    probabilities = pd.DataFrame(pred.summary["mean_probs"], columns=pred.classes)
    probabilities.insert(0, "cell_id", pred.cell_ids)
    return {"predictions.csv": predictions, "probabilities.csv": probabilities}


def write_outputs(directory: Path, adata: anndata.AnnData, plots: dict[str, bytes], jsons: dict[str, dict]) -> None:
    """The outputs but the CSV tables into `directory` (a fresh staging directory swapped into place afterwards):
    the .h5ad first (the likeliest to fail), run.json last."""
    write_h5ad(directory / "predictions.h5ad", adata)  # built in memory: a full disk is one line, never HDF5 mid-file
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
    if pred.voting is not None:
        changed = float((pred.voting["majority_label"].to_numpy() != pred.pred_label).mean())
        print(f"majority voting over {pred.voting['cluster'].nunique()} clusters: {changed:.1%} of cells get another "
              f"label from their cluster (mean agreement {pred.voting['majority_agreement'].mean():.2f})")
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
    """Everything one prediction run produced, before anything is written: the user's result, and what the CLI
    needs besides (the Prediction for plots and reports, the checkpoints' versions, the label column)."""

    result: AnnotationResult
    prediction: Prediction
    members: list[Checkpoint]
    label_key: str | None

    @property
    def metrics(self) -> dict | None:
        return self.result.metrics

    @property
    def rows(self) -> np.ndarray:
        """Positions of the predicted cells in the input AnnData."""
        return self.result.rows

    @cached_property
    def adata(self) -> anndata.AnnData:
        """predictions.h5ad: a copy of the predicted cells with the results in obs, obsm and uns (without the
        expression matrix when the input was read backed, see `AnnotationResult.to_adata`)."""
        return self.result.to_adata(inplace=False)


def over_clustering(config: PredictConfig, obs: pd.DataFrame, cells: ExpressionData | None,
                    rows: np.ndarray) -> tuple[np.ndarray, dict]:
    """The clusters majority voting runs over, one per predicted cell: --over_clustering's obs column, else a Leiden
    over-clustering of the `cells`' log-normalized expression (all their genes, not only the model's); and how they
    were made, for the metadata."""
    if config.over_clustering is not None:
        source = config.data_path or "the AnnData"
        return (clusters_from_column(obs, config.over_clustering, rows, source),
                {"over_clustering": f"obs[{config.over_clustering!r}]"})
    clusters, resolution = leiden_over_clustering(cells.matrix, seed=config.seed)
    return clusters, {"over_clustering": "leiden", "resolution": resolution}


def annotate_with(config: PredictConfig, adata: anndata.AnnData | None = None,
                  on_chunk: Callable[[Prediction], None] | None = None) -> Annotation:
    """load the model -> open the data (a file backed) -> (over-cluster) -> predict chunk by chunk -> vote ->
    evaluate; the CLI and `annotate` share it. `on_chunk` gets each chunk's Prediction as it is made (the CLI
    appends it to the CSV files), except with majority voting, whose labels need every cell first."""
    members = load_ensemble(config.model_path)
    check_model_flags(config, members[0])
    check_class_names(members[0].classes, f"the model {config.model_path}", "retrain it with that class renamed in obs")
    if adata is not None:
        return annotate_input(config, members, Input(adata, "the AnnData", config.label_key, config.use_raw), on_chunk)
    source = read_input(config.data_path, label_key=config.label_key, layer=config.layer, use_raw=config.use_raw,
                        backed=True)
    try:
        return annotate_input(config, members, source, on_chunk)
    finally:  # the result keeps the AnnData's obs, obsm and uns, which backed mode holds in memory
        if source.adata.isbacked:
            source.adata.file.close()


def annotate_input(config: PredictConfig, members: list[Checkpoint], source: Input,
                   on_chunk: Callable[[Prediction], None] | None) -> Annotation:
    """`annotate_with` for an opened input: a backed AnnData streams a chunk at a time, unless Leiden
    over-clustering needs every cell's expression at once; an in-memory AnnData is read and checked whole."""
    checkpoint, adata = members[0], source.adata
    rows = selected_rows(adata.obs_names, config.cells)
    n_genes = max(adata.n_vars, adata.raw.n_vars if adata.raw is not None else 0)
    size = chunk_cells(n_genes, config.chunk_size)
    streamed = adata.isbacked and not (config.majority_voting and config.over_clustering is None)
    reader = cell_reader(adata, label_key=source.label_key, layer=config.layer, use_raw=source.use_raw,
                         normalize=config.normalize, require_labels=config.label_key is not None,
                         gene_symbols=config.gene_symbols, source=source.name, any_scale=checkpoint.bin_edges is not None,
                         first_rows=first_rows(rows, size, streamed))
    whole = None if streamed else subset(reader.read(ALL_CELLS), rows)
    blocks = read_blocks(reader, rows, size) if streamed else [whole]
    clusters, voting = over_clustering(config, adata.obs, whole, rows) if config.majority_voting else (None, {})
    chunks = aligned_chunks(blocks, size, checkpoint.genes, allow_missing=config.allow_missing_genes)
    pred = predict(members, chunks, len(rows), config, ensemble_temperature(config.model_path),
                   None if config.majority_voting else on_chunk)
    if clusters is not None:
        pred.voting = majority_vote(pred.pred_label, clusters)
        voting["n_clusters"] = int(pred.voting["cluster"].nunique())
    metrics = evaluate(pred) if pred.true_labels is not None else None
    metadata = {"model_path": str(config.model_path), "checkpoint_stage": checkpoint.stage, "ensemble_size": len(members),
                "bayes_mc_samples": config.bayes_mc_samples, "seed": config.seed, "unassign_by": pred.rule[0],
                "unassign_thres": pred.rule[1], "classes": list(pred.classes), "versions": package_versions()}
    if voting:
        metadata["majority_voting"] = voting
    if metrics is not None and "accuracy" in metrics:
        metadata["metrics"] = {key: metrics[key] for key in ("accuracy", "macro_f1", "ece", "nll")}
    table = pred.table(config.key_added)
    probabilities = pd.DataFrame(pred.summary["mean_probs"], index=table.index, columns=list(pred.classes))
    result = AnnotationResult(table, probabilities, metrics, metadata, config.key_added, adata=adata, rows=rows)
    return Annotation(result, pred, members, reader.label_key)


def annotate(adata: anndata.AnnData, model: str | os.PathLike, *, inplace: bool = False, **given) -> AnnotationResult:
    """Annotate an AnnData as `predict_updated.py` does a file; returns an `AnnotationResult`.

    An in-memory AnnData is read and checked whole; a backed one (`anndata.read_h5ad(path, backed="r")`) is
    streamed `chunk_size` cells at a time, so an atlas needs memory for its per-cell results only.

    `result.predicted_labels` holds per cell the label (Unassigned where unsure), the best guess, every uncertainty
    and, with `majority_voting=True`, the cluster's majority label; `result.probability_matrix` the class
    probabilities; `result.metrics` the evaluation when `label_key` names true types. The same columns as the
    CLI's predictions.csv and predictions.h5ad, named `{key_added}_label`, `{key_added}_confidence`, ... (default
    key "pred"). `inplace=True` also writes them into `adata` (obs, obsm[f"{key_added}_probabilities"],
    uns[key_added]), as `result.to_adata(adata)` does; else `adata` is left as it was.

    `model` is a checkpoint file or a run directory (an ensemble); `given` are the CLI's options by name, e.g.
    `annotate(adata, "runs/demo/stageB2", bayes_mc_samples=8, gene_symbols="feature_name", majority_voting=True)`.
    """
    file_only = sorted({"model_path", "data_path", "output_dir", "overwrite", "cells"} & set(given))
    if file_only:
        raise TypeError(f"annotate() takes the data and the model as arguments and writes no files; drop {file_only}")
    result = annotate_with(default_config(model, **given), adata).result
    if inplace:
        result.to_adata(adata)
    return result


def run(config: PredictConfig) -> dict:
    """lock the output directory -> validate -> load -> predict -> summarise -> write beside the old outputs and
    swap them in as a whole; returns the run summary."""
    with locked(config.output_dir, "output directory"):
        return _run_locked(config)


def _run_locked(config: PredictConfig) -> dict:
    started = time.perf_counter()
    validate_outputs(config)
    # CSV rows are written as chunks finish, into the staging directory that replaces the outputs at the end.
    with staged_replacement(config.output_dir) as staging, CsvAppender(staging, CSV_FILES) as tables:
        result = annotate_with(config, on_chunk=lambda part: tables.append(output_tables(part, config.key_added)))
        pred, metrics, label_key = result.prediction, result.metrics, result.label_key
        if config.majority_voting:  # the cluster's label of every cell is known only now
            tables.append(output_tables(pred, config.key_added))
        report(metrics, pred, label_key)
        adata = result.adata
        umap = np.asarray(adata.obsm["X_umap"])[:, :2] if "X_umap" in adata.obsm else None
        plots = make_plots(pred, metrics, umap)
        summary = run_summary(pred, metrics, label_key, seconds=time.perf_counter() - started)
        versions = adata.uns[config.key_added]["versions"]
        jsons = {"metrics.json": metrics} if metrics is not None else {}
        jsons["run.json"] = {"args": config.as_dict(), "versions": versions,
                             "checkpoint_versions": result.members[0].versions, "summary": summary}
        write_outputs(staging, adata, plots, jsons)
    print(f"done: {summary['n_cells']} cells in {time.perf_counter() - started:.1f} s (inference {pred.seconds:.1f} s, "
          f"{summary['cells_per_second']:.0f} cells/s), {summary['unassigned_share']:.1%} unassigned -> {config.output_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line message for problems the user can fix)."""
    return run_cli(lambda: run(options.cli_config(PredictConfig, argv, __doc__)),
                   interrupted="interrupted; nothing was written: rerun the command")


if __name__ == "__main__":
    sys.exit(main())
