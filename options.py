"""Every option of training and prediction, in one place: its default, conversion, allowed values and help.

The argparse parsers are generated from these dataclasses, and one validation (`make`) serves the command line,
the Python API (`fit`, `annotate`, `pipeline`), the presets, the benchmarks and `--resume`: what one refuses,
all refuse. A configuration also records which options its user gave (`given`), so a checkpoint's settings are
only contradicted by what the user really asked for, never by a default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from annotation import KEY_CHECK
from bayesian_sparse_transformer import PRUNABLE_LAYERS, PRUNE_MODES, PRUNE_SCORES
from novelty import NOVELTY_INPUT_PCS, NOVELTY_PARTS
from utils import UserError, register_option_names

UNASSIGN_RULES = ("novelty", "confidence", "entropy", "mutual_info")
# --unassign_thres per rule when not given: novelty is relative to the checkpoints' own thresholds (1.0 = theirs);
# confidence < 0.5 is scBERT's novel-type rule.
DEFAULT_THRESHOLDS = {"novelty": 1.0, "confidence": 0.5, "entropy": 0.5, "mutual_info": 0.5}
STAGES = ("A", "B1", "B2")
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
PRESET_DIR = Path(__file__).resolve().parent / "presets"


# --------------------------------------------------------------------------------------------------------------
# How an option is declared
# --------------------------------------------------------------------------------------------------------------


Check = tuple[Callable[[Any], bool], str]  # (predicate on the value, what it must be: "must be at least 1")


def option(default: Any, help: str, *, group: str, choices: Iterable[Any] | None = None, check: Check | None = None,
           convert: Callable[[str], Any] | None = None, metavar: str | None = None, aliases: tuple[str, ...] = (),
           deprecated: tuple[str, ...] = (), cli: bool = True) -> Any:
    """A dataclass field that carries everything the parser and the validation need.

    `convert` turns the command line's text (and a string given in Python) into the value; `check` bounds it;
    `deprecated` flags still work with a warning; `cli=False` options exist only in Python (e.g. `verbose`).
    """
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices is not None else None, "check": check,
            "convert": convert, "metavar": metavar, "aliases": aliases, "deprecated": deprecated, "cli": cli}
    return field(default=default, metadata=meta)


def at_least(low: float) -> Check:
    return (lambda v: v >= low, f"must be at least {low:g}")


def positive() -> Check:
    return (lambda v: v > 0, "must be positive")


def in_interval(low: float, high: float, closed: str = "[]") -> Check:
    """low/high bounds; `closed` says which ends are included: '[]', '[)', '(]' or '()'."""
    def inside(v: float) -> bool:
        above = v >= low if closed[0] == "[" else v > low
        below = v <= high if closed[1] == "]" else v < high
        return above and below
    return (inside, f"must be in {closed[0]}{low:g}, {high:g}{closed[1]}")


SEED_CHECK: Check = (lambda v: 0 <= v <= SEED_MAX, f"must be between 0 and {SEED_MAX} (2**32 - 1)")


def comma_list(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """'a,b' -> ('a', 'b'), each name one of `allowed`, duplicates dropped, order kept."""
    def convert(text: str) -> tuple[str, ...]:
        names = [name.strip() for name in str(text).split(",") if name.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise ValueError(f"expected a comma-separated list of {','.join(allowed)}, got {text!r}")
        return tuple(dict.fromkeys(names))
    return convert


def kl_weight_value(text: str) -> float | str:
    """--kl_weight: a number, or 'elbo' for 1 / training cells."""
    if text == "elbo":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number or 'elbo', got {text!r}") from None


def _kind(annotation: str) -> tuple[str, bool]:
    """('int'|'float'|'str'|'bool'|'other', accepts None) from a field's annotation string."""
    parts = [part.strip() for part in annotation.split("|")]
    optional = "None" in parts
    parts = [part for part in parts if part != "None"]
    return (parts[0] if len(parts) == 1 and parts[0] in ("int", "float", "str", "bool") else "other"), optional


def _bool_text(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false (or 1/0), got {text!r}")


def _convert(spec, value: Any) -> Any:
    """One option's value in its declared type, from the command line's text or a Python value."""
    kind, optional = _kind(spec.type if isinstance(spec.type, str) else spec.type.__name__)
    convert = spec.metadata["convert"]
    if value is None:
        if optional:
            return None
        raise ValueError("must not be None")
    if convert is not None:
        return convert(value) if isinstance(value, str) else value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _bool_text(value)
        raise ValueError(f"expected True or False, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            return int(value) if isinstance(value, int | float) else int(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind == "str":
        if not isinstance(value, str | os.PathLike):
            raise ValueError(f"expected a string, got {value!r}")
        return os.fspath(value)
    return value


# --------------------------------------------------------------------------------------------------------------
# The options
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions:
    """What to read: shared by training and prediction, with the same names and meanings."""

    data_path: str | None = option(None, "AnnData .h5ad with log-normalized expression; default: the bundled PBMC data "
                                   "(scanpy's pbmc68k_reduced, 700 cells, 10 types)", group="data")
    label_key: str | None = option("cell_type", "obs column with cell types (the bundled data uses bulk_labels)", group="data")
    layer: str | None = option(None, "read expression from adata.layers[LAYER] instead of .X", group="data")
    use_raw: bool | None = option(None, "read expression from adata.raw; --no_use_raw: from .X (default: automatic, .X "
                                  "unless it is scaled or not log-normalized and .raw holds usable values: then .raw, "
                                  "with a warning)", group="data")
    normalize: bool = option(False, "normalize_total + log1p raw counts instead of refusing them", group="data")
    gene_symbols: str | None = option(None, "name genes by this adata.var column (e.g. gene_symbols, feature_name) "
                                      "instead of var_names, which are often Ensembl IDs", group="data", metavar="COLUMN")
    gene_num: int | None = option(None, "number of genes (scBERT's flag, its default 166): checked against the data (training) or the "
                                  "model (prediction)", group="data", check=at_least(1))
    bin_num: int | None = option(None, "expression bins (training default: 28 quantile bins, or scBERT's 5 with --binning "
                                 "width; a checkpoint fixes it: only repeat it)", group="data", check=at_least(1))
    # run
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)", group="run")
    amp: bool = option(False, "bf16/fp16 autocast on CUDA", group="run")
    num_workers: int = option(0, "DataLoader worker processes", group="run", check=at_least(0))
    overwrite: bool = option(False, "replace the outputs of an earlier run", group="run")
    seed: int = option(2021, "random seed", group="run", check=SEED_CHECK)
    verbose: bool = option(True, "progress bars and per-fold reports on the console", group="run", cli=False)

    # Options that say where and how to run, not what to compute: they may differ between a run and its --resume,
    # and they are not part of a preset.
    RUNTIME = frozenset({"device", "amp", "num_workers", "overwrite", "verbose", "resume", "data_path", "ckpt_dir", "backed",
                         "output_dir", "preset", "stage"})

    @property
    def given(self) -> frozenset[str]:
        """The options its user set (command line, keyword or environment): the rest are defaults or a preset's."""
        return getattr(self, "_given", frozenset())

    def as_dict(self) -> dict:
        """Plain values as the run's JSON holds them (tuples as lists), so a resumed run compares like with like."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def cross_checks(self) -> list[tuple[bool, str]]:
        return []


@dataclass(frozen=True)
class TrainConfig(DataOptions):
    """Every option of one training run (finetune_sparse.py); recorded as `args` in the run's manifest and in
    every checkpoint."""

    PROGRAM = "finetune_sparse.py"

    min_cells_per_class: int = option(0, "drop cell types with fewer cells (a split needs at least 2)", group="data",
                                      check=at_least(0))
    backed: bool = option(False, "train from the .h5ad file on disk, reading each batch's cells, instead of loading the "
                          "matrix (csr or dense, not csc); automatic when loading it would take more than half the "
                          "available memory (about 24 bytes per stored value)", group="data")
    binning: str | None = option(None, "how values become tokens: quantile = BIN_NUM bins holding equal shares of the "
                                 "training data's non-zero values, cut points kept in the model (any scale: log, CPM, "
                                 "TPM, FPKM); width = floor(value / BIN_WIDTH) clipped to BIN_NUM, scBERT's, for "
                                 "log-normalized data (default: quantile; width with a scBERT encoder or --bin_width; "
                                 "a checkpoint's own when continuing it)", group="data", choices=("quantile", "width"))
    bin_width: float | None = option(None, "--binning width: width of a bin in log-expression units; 1 = scBERT's binning "
                                     "(default: 1, or the --model_path checkpoint's); 0.25 with --bin_num 28 resolves the "
                                     "0.7-2 range where most non-zero values lie", group="data", check=positive())
    # model
    model_path: str | None = option(None, "start from a checkpoint: scBERT's pretrained PerformerLM (encoder init), a "
                                    "Stage A checkpoint (Stage B) or a Stage B checkpoint (round 2); or a run directory "
                                    "of a --cv_splits K run, whose fold k model fold k continues", group="model")
    dim: int = option(200, "encoder width", group="model", check=at_least(1))
    depth: int = option(6, "Performer layers", group="model", check=at_least(1))
    heads: int = option(10, "attention heads", group="model", check=at_least(1))
    dim_head: int = option(64, "width of each attention head", group="model", check=at_least(1))
    nb_features: int | None = option(None, "FAVOR+ random features (default dim_head*ln(dim_head))", group="model",
                                     check=at_least(1))
    feature_redraw_interval: int = option(1000, "redraw the random features every N training forward passes", group="model",
                                          check=at_least(1))
    local_attn_heads: int = option(0, "heads using windowed softmax attention instead of FAVOR+", group="model",
                                   check=at_least(0))
    pos_embed: bool = option(True, "add a gene embedding (gene2vec from --gene2vec_path, else learned); "
                             "--no_pos_embed: none", group="model")
    gene2vec_path: str | None = option(None, "gene2vec vectors: .npy in the data's gene order, or text 'SYMBOL v1 ... vDIM'",
                                       group="model")
    h_dim: int = option(128, "width of the head's fc2", group="model", check=at_least(1))
    dropout: float = option(0.0, "dropout in the head (and the encoder's feed-forward)", group="model",
                            check=in_interval(0, 1, "[)"))
    gradient_checkpointing: bool = option(False, "recompute each encoder block's activations in backward instead of "
                                          "storing them: ~30%% more time per step for much less activation memory",
                                          group="model")
    trainable_layers: int | None = option(None, "train only the last N encoder layers (+ final norm and head); -1 = all; "
                                          "default: all, or 1 with a scBERT pretrained encoder as scBERT does",
                                          group="model")
    # Bayesian head
    bayes_head: bool = option(False, "make fc1/fc2 Bayesian (variational inference)", group="Bayesian head (Stage B)")
    kl_weight: float | str = option(1e-6, "final weight of the KL term per training step; 'elbo' = 1 / training cells",
                                    group="Bayesian head (Stage B)", convert=kl_weight_value,
                                    check=(lambda v: v == "elbo" or v >= 0, "must be at least 0 (or 'elbo')"))
    kl_anneal_steps: int = option(10000, "optimizer steps over which the KL weight rises linearly from 0",
                                  group="Bayesian head (Stage B)", check=at_least(0))
    mc_samples: int = option(1, "head samples per training step", group="Bayesian head (Stage B)", check=at_least(1),
                             deprecated=("bayes_mc_samples",))
    mc_samples_eval: int = option(8, "head samples for validation", group="Bayesian head (Stage B)", check=at_least(1))
    pre_warm_epochs: int = option(1, "first epochs of Stage B with the posterior means only (no KL)",
                                  group="Bayesian head (Stage B)", check=at_least(0))
    prior_sigma: float = option(0.1, "standard deviation of the Gaussian prior", group="Bayesian head (Stage B)",
                                check=positive())
    init_log_sigma: float = option(-5.0, "initial log standard deviation of ported weights", group="Bayesian head (Stage B)")
    local_reparam: bool = option(False, "local reparameterization trick in training", group="Bayesian head (Stage B)")
    # structured pruning
    prune_target: float = option(0.3, "fraction of fc1/fc2 slices to remove in the end (0 = no pruning)",
                                 group="structured pruning (Stage B)", check=in_interval(0, 1, "[)"))
    prune_step: float = option(0.1, "fraction removed per pruning step", group="structured pruning (Stage B)",
                               check=positive())
    prune_ft_epochs: int = option(4, "fine-tuning epochs after each pruning step", group="structured pruning (Stage B)",
                                  check=at_least(0))
    prune_rule: str = option("paired", "when to stop pruning. paired: compare each pruned model with the unpruned model "
                             "this run started pruning from, cell by cell on the same validation cells, and keep a level while the 95%% "
                             "bootstrap upper bound of the mean NLL increase is at most PRUNE_NLL_TOL and at most "
                             "PRUNE_MAX_CHANGED of the cells change their predicted type; f1: keep it while validation "
                             "macro-F1 stays within PRUNE_F1_TOL of the start", group="structured pruning (Stage B)",
                             choices=("paired", "f1"))
    prune_nll_tol: float = option(0.02, "paired rule: largest tolerated mean increase of the per-cell validation NLL",
                                  group="structured pruning (Stage B)", check=at_least(0))
    prune_max_changed: float = option(0.05, "paired rule: largest tolerated share of validation cells whose predicted "
                                      "type changes", group="structured pruning (Stage B)", check=in_interval(0, 1))
    prune_f1_tol: float = option(0.01, "f1 rule: stop when validation macro-F1 drops more than this below the start",
                                 group="structured pruning (Stage B)", check=at_least(0))
    prune_dim: int = option(0, "0: prune output neurons (rows), 1: inputs (columns)", group="structured pruning (Stage B)",
                            choices=(0, 1))
    prune_layers: tuple[str, ...] = option(PRUNABLE_LAYERS, "comma-separated layers to prune",
                                           group="structured pruning (Stage B)", convert=comma_list(PRUNABLE_LAYERS),
                                           metavar="LAYER[,LAYER]")
    prune_mode: str = option("physical", "physical: rebuild smaller layers; mask: zero in place",
                             group="structured pruning (Stage B)", choices=PRUNE_MODES)
    prune_score: str = option("l2", "which slices go first. l2: smallest norm of the posterior means; snr: smallest "
                              "mean |mu|/sigma (Bayesian head only)", group="structured pruning (Stage B)",
                              choices=PRUNE_SCORES)
    prune_refit: bool = option(True, "after each pruning step, refit the layer that reads the removed neurons (least "
                               "squares on the training cells' activations) so it computes what it did before",
                               group="structured pruning (Stage B)")
    prune_refit_ridge: float = option(0.01, "refit: shrinkage toward the old weights, relative to the activations' mean "
                                      "second moment", group="structured pruning (Stage B)", check=positive())
    prune_refit_cells: int = option(4096, "refit: at most this many training cells supply the activations",
                                    group="structured pruning (Stage B)", check=at_least(1))
    prune_distill: float = option(0.0, "fine-tune pruned models toward the unpruned model's probabilities: loss = "
                                  "(1 - ALPHA) cross-entropy + ALPHA KL(unpruned || pruned); 0 = labels only",
                                  group="structured pruning (Stage B)", check=in_interval(0, 1), metavar="ALPHA")
    # training
    epoch: int = option(100, "training epochs (one shuffled pass over the training cells each)", group="training",
                        check=at_least(0))
    batch_size: int = option(3, "cells per batch and device", group="training", check=at_least(1))
    grad_acc: int = option(60, "batches per optimizer step", group="training", check=at_least(1))
    learning_rate: float = option(1e-4, "peak learning rate of the encoder", group="training", check=positive())
    head_lr_mult: float = option(1.0, "head learning rate = LEARNING_RATE * HEAD_LR_MULT", group="training",
                                 check=positive())
    weight_decay: float = option(0.01, "AdamW weight decay (0 = Adam)", group="training", check=at_least(0))
    warmup_ratio: float = option(0.05, "share of steps with linear learning-rate warm-up before the cosine decay",
                                 group="training", check=in_interval(0, 1, "[)"))
    grad_clip: float = option(1.0, "clip the gradient norm (0 = off)", group="training", check=at_least(0))
    l1_lambda: float = option(0.0, "L1 penalty on fc1/fc2 weights", group="training", check=at_least(0))
    group_lasso: float = option(0.0, "group-lasso penalty LAMBDA * sum of the L2 norms of fc1/fc2's slices along "
                                "--prune_dim (0 = off)", group="training", check=at_least(0), metavar="LAMBDA")
    sample_with_replacement: bool = option(False, "draw training cells with replacement (the original scBERT loader)",
                                           group="training")
    cv_splits: int = option(1, "1: one stratified 80/20 train/validation split; K >= 2: stratified K-fold cross-fitting, "
                            "every cell validates one fold model, and the run is a K-model ensemble", group="training",
                            check=at_least(1))
    temperature_scaling: bool = option(False, "after training, fit a temperature to each fold's validation cells",
                                       group="training")
    ensemble_temperature: bool = option(True, "after training, fit one temperature for the ensemble to the "
                                        "out-of-fold validation predictions of every training cell (each predicted by a "
                                        "fold model that never trained on it); where it sharpens (below 1: under-"
                                        "confident members), prediction from the run directory divides the pooled "
                                        "log-probabilities by it", group="training")
    novelty_fpr: float = option(0.05, "share of known validation cells above the novelty threshold", group="training",
                                check=in_interval(0, 1, "()"))
    novelty_parts: tuple[str, ...] = option(NOVELTY_PARTS, "views combined into the novelty score", group="training",
                                            convert=comma_list(NOVELTY_PARTS), metavar="VIEW[,VIEW]")
    novelty_input_pcs: int = option(NOVELTY_INPUT_PCS, "principal components of the binned expression that the input_* views measure "
                                    "in", group="training", check=at_least(1))
    patience: int = option(10, "stop after this many validations without a better SELECT_METRIC", group="training",
                           check=at_least(1))
    select_metric: str = option("nll", "validation metric for early stopping and the best checkpoint",
                                group="training", choices=("nll", "macro_f1"))
    class_weight: str = option("balanced", "cross-entropy class weights: balanced or none", group="training",
                               choices=("balanced", "none"))
    valid_every: int = option(1, "validate every N epochs", group="training", check=at_least(1))
    # run
    ckpt_dir: str = option("./ckpts/", "output directory (the run directory)", group="run")
    model_name: str = option("finetune", "prefix of the output files", group="run")
    resume: bool = option(False, "continue an interrupted run in CKPT_DIR from its last checkpoint", group="run")
    preset: str | None = option(None, "tuned values for a stage (see presets/): demo or full; options you give win",
                                group="run")
    stage: str | None = option(None, "which stage of the preset: A, B1 or B2 (default: A without --model_path, B1 from "
                               "a deterministic model, B2 from a Bayesian one)", group="run", choices=STAGES)

    def cross_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.epoch >= 1 or bool(self.model_path),
             "--epoch 0 trains nothing: a model from scratch needs --epoch 1 or more (--epoch 0 only evaluates or "
             "prunes a --model_path checkpoint)"),
            (not (self.local_reparam and self.mc_samples > 1),
             "--local_reparam samples pre-activations of one network per step and cannot average --mc_samples "
             "networks; use one of the two"),
            (self.local_attn_heads <= self.heads, "--local_attn_heads must be between 0 and --heads"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other: pick one"),
            (not (self.binning == "quantile" and self.bin_width is not None),
             "--bin_width sets the width of --binning width bins; drop it, or add --binning width"),
        ]

    @property
    def layers_to_prune(self) -> tuple[str, ...]:
        return self.prune_layers


@dataclass(frozen=True)
class PredictConfig(DataOptions):
    """Every option of one prediction run (predict_updated.py); recorded as `args` in run.json."""

    PROGRAM = "predict_updated.py"

    label_key: str | None = option(None, "obs column with true cell types; turns on evaluation", group="data")
    cells: str | None = option(None, "text file of cell ids (obs names), one per line: predict only these, e.g. "
                               "{model_name}{fold}_val_cells.txt from training", group="data")
    allow_missing_genes: bool = option(False, "predict even when fewer than half of the model's genes are in the data "
                                       "(missing genes are zeros)", group="data")
    pos_embed: bool | None = option(None, "scBERT's flag: the model brings its gene embedding; --pos_embed/--no_pos_embed "
                                    "only check that it has one / has none", group="data")
    # model and prediction
    model_path: str | None = option(None, "a run directory of finetune_sparse.py (its fold models form an ensemble whose "
                                    "probabilities are pooled) or one checkpoint file", group="model and prediction")
    bayes_mc_samples: int = option(8, "head samples per cell and ensemble member; 1 = the posterior means only",
                                   group="model and prediction", check=at_least(1))
    unassign_by: str = option("novelty", "score deciding which cells are Unassigned: novelty (how unlike the training "
                              "cells), or confidence, entropy, mutual_info", group="model and prediction",
                              choices=UNASSIGN_RULES)
    unassign_thres: float | None = option(None, "novelty: Unassigned above it (default 1.0 = the threshold stored at "
                                          "training); confidence: below it (default 0.5, scBERT's rule); "
                                          "entropy/mutual_info: above it (default 0.5)", group="model and prediction")
    call_balance: float = option(0.75, "how much the call favours rarer cell types: the label maximises probability "
                                 "x training share^-call_balance; 0 = the most probable type (scBERT), 1 = balanced "
                                 "accuracy's call; the probabilities are unchanged", group="model and prediction",
                                 check=in_interval(0.0, 1.0))
    batch_size: int = option(32, "cells per batch", group="model and prediction", check=at_least(1))
    chunk_size: int | None = option(None, "cells read, checked and predicted at a time from an .h5ad file, which is "
                                    "read backed: memory follows the chunk, not the file (default 10,000, fewer at "
                                    "so many genes that a dense chunk would pass 256 MB)", group="model and prediction",
                                    check=at_least(1))
    # majority voting
    majority_voting: bool = option(False, "also give each cell the label most cells of its cluster got, and the "
                                   "cluster's agreement (CellTypist's majority voting)", group="majority voting")
    over_clustering: str | None = option(None, "obs column with the clusters to vote in (default: Leiden "
                                         "over-clustering of the predicted cells, resolution 5 below 5,000 cells, "
                                         "rising to 30 from 200,000)", group="majority voting", metavar="COLUMN")
    # outputs
    key_added: str = option("pred", "prefix of the result columns: KEY_label, KEY_confidence, ... in obs and "
                            "predictions.csv, obsm['KEY_probabilities'], uns['KEY'] (scanpy's key_added)", group="run",
                            check=KEY_CHECK, metavar="KEY")
    output_dir: str = option("./predictions", "directory for the outputs", group="run")
    preset: str | None = option(None, "tuned prediction values (see presets/): demo or full; options you give win",
                                group="run")

    def cross_checks(self) -> list[tuple[bool, str]]:
        thres = self.threshold
        checks = [(math.isfinite(thres), "--unassign_thres must be a finite number")]
        if self.unassign_by == "confidence":
            checks.append((0 <= thres <= 1, "--unassign_thres must be in [0, 1] with --unassign_by confidence"))
        else:
            checks.append((thres >= 0, f"--unassign_thres must be at least 0 with --unassign_by {self.unassign_by}"))
        checks.append((self.model_path is not None, "--model_path is required: a run directory or a checkpoint file"))
        checks.append((self.over_clustering is None or self.majority_voting,
                       "--over_clustering names the clusters of --majority_voting; add --majority_voting"))
        return checks

    @property
    def threshold(self) -> float:
        """--unassign_thres, or the rule's default."""
        return DEFAULT_THRESHOLDS[self.unassign_by] if self.unassign_thres is None else float(self.unassign_thres)


def option_fields(cls: type) -> dict[str, Any]:
    """The options of a config class by name, in declaration order."""
    return {spec.name: spec for spec in fields(cls)}


register_option_names({spec.name: _kind(spec.type)[0] == "bool"
                       for cls in (TrainConfig, PredictConfig) for spec in fields(cls)})


# --------------------------------------------------------------------------------------------------------------
# Presets: tuned values per stage, as JSON files in presets/
# --------------------------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """A preset's stages: {"A": {...}, "B1": {...}, "B2": {...}, "predict": {...}}; "common" is merged into A/B1/B2."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise UserError(f"--preset {name} does not exist; choose one of {', '.join(preset_names())}")
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    common = raw.get("common", {})
    stages = {stage: {**common, **raw.get(stage, {})} for stage in STAGES}
    stages["predict"] = dict(raw.get("predict", {}))
    stages["description"] = raw.get("description", "")
    return stages


def preset_values(name: str | None, stage: str) -> dict:
    """The values a preset sets for one stage ('A', 'B1', 'B2' or 'predict'); {} without a preset."""
    return {} if name is None else dict(load_preset(name)[stage])


# --------------------------------------------------------------------------------------------------------------
# Building and checking a configuration: the one path for every caller
# --------------------------------------------------------------------------------------------------------------


def make(cls: type, given: dict[str, Any], *, defaults: dict[str, Any] | None = None,
         stage_of: Callable[[dict], str] | None = None):
    """A checked, frozen configuration of `cls`: program `defaults` < the preset's values < `given`.

    `given` holds the user's options by name (Python values or the command line's strings); unknown names raise
    TypeError naming them. `stage_of` picks the preset's stage from the merged options (training); prediction
    uses the preset's "predict" values. Every value is converted and checked here, whoever called.
    """
    specs = option_fields(cls)
    given = _resolve_deprecated(specs, dict(given))
    unknown = sorted(set(given) - set(specs))
    if unknown:  # only Python can pass a name argparse does not know: a TypeError, as for any unknown keyword
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; see {cls.PROGRAM} --help for the options")
    values = dict(defaults or {})
    preset = given.get("preset", values.get("preset"))
    if preset is not None:
        stage = "predict" if stage_of is None else stage_of({**values, **given})
        values.update(preset_values(preset, stage))
    values.update(given)
    converted = {name: _checked(specs[name], value) for name, value in values.items()}
    config = cls(**converted)
    object.__setattr__(config, "_given", frozenset(given))
    for ok, message in config.cross_checks():
        if not ok:
            raise UserError(message)
    return config


def _resolve_deprecated(specs: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    for name, spec in specs.items():
        for old in spec.metadata["deprecated"]:
            if old in given and old not in specs:
                warnings.warn(f"--{old} is deprecated in this program; it is now --{name}", DeprecationWarning,
                              stacklevel=4)
                given.setdefault(name, given.pop(old))
    return given


def _checked(spec, value: Any) -> Any:
    """Convert and check one option's value; a UserError names the option and what it must be."""
    try:
        value = _convert(spec, value)
    except (TypeError, ValueError) as err:
        raise UserError(f"--{spec.name}: {err}") from None
    choices = spec.metadata["choices"]
    if value is not None and choices is not None and value not in choices:
        raise UserError(f"--{spec.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    check = spec.metadata["check"]
    if value is not None and check is not None and not check[0](value):
        raise UserError(f"--{spec.name} {check[1]}, got {value!r}")
    return value


def with_changes(config, **changes):
    """The config with options resolved later (binning from a checkpoint, ...); their origin stays as it was."""
    updated = replace(config, **changes)
    object.__setattr__(updated, "_given", config.given)
    return updated


# --------------------------------------------------------------------------------------------------------------
# The command line, generated from the fields
# --------------------------------------------------------------------------------------------------------------


def build_parser(cls: type, description: str, *, defaults: dict[str, Any] | None = None,
                 preset: str | None = None, stage: str = "A") -> argparse.ArgumentParser:
    """argparse for `cls`: every option's flag, help, choices and metavar from its field.

    Parsed values are only those the user typed (argparse.SUPPRESS as every default), so a configuration knows
    what was given. The help shows the program's defaults, or a preset's values with `--preset NAME --help`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS, usage="%(prog)s [options]")
    shown = {spec.name: spec.default for spec in fields(cls)} | (defaults or {})
    if preset is not None:
        shown |= preset_values(preset, "predict" if cls is PredictConfig else stage)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in fields(cls):
        meta = spec.metadata
        if not meta.get("cli", True):
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, _ = _kind(spec.type)
        default = shown[spec.name]
        text = meta["help"]
        if default is not None and not (kind == "bool" and default is False):
            shown_value = ",".join(default) if isinstance(default, tuple) else default
            text += f" (default: {shown_value})"
        flags = [f"--{spec.name}", *(f"--{alias}" for alias in meta["aliases"])]
        flags += [f"--{old}" for old in meta["deprecated"]]
        if kind == "bool":
            group.add_argument(*flags, dest=spec.name, action="store_const", const=True, help=text)
            group.add_argument(f"--no_{spec.name}", f"--no-{spec.name}", dest=spec.name, action="store_const",
                               const=False, help=argparse.SUPPRESS)
        else:
            choices = meta["choices"]
            metavar = meta["metavar"] or ("{" + ",".join(map(str, choices)) + "}" if choices else spec.name.upper())
            group.add_argument(*flags, dest=spec.name, metavar=metavar, help=text)
    return parser


def parse_given(cls: type, argv: list[str] | None, description: str, *, defaults: dict[str, Any] | None = None,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """The options a user gave on the command line (as text), after a deprecated flag's warning.

    `--preset NAME --help` prints the help with the preset's values; a deprecated flag (e.g. --bayes_mc_samples for
    training) is reported once.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    peek = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    peek.add_argument("--preset")
    peek.add_argument("--stage")
    known, _ = peek.parse_known_args(argv)
    preset = getattr(known, "preset", None)
    if preset is not None and preset not in preset_names():
        preset = None  # refused with its message by `make`
    parser = build_parser(cls, description, defaults=defaults, preset=preset, stage=getattr(known, "stage", None) or "A")
    given = vars(parser.parse_args(argv))
    specs = option_fields(cls)
    for name, spec in specs.items():
        for old in spec.metadata["deprecated"]:
            if f"--{old}" in argv:
                print(f"warning: --{old} is deprecated here; use --{name}", file=sys.stderr)
    return given


def cli_config(cls: type, argv: list[str] | None, description: str, *, defaults: dict[str, Any] | None = None,
               stage_of: Callable[[dict], str] | None = None):
    """The configuration of a command line: parse, then the one validation (`make`)."""
    return make(cls, parse_given(cls, argv, description, defaults=defaults), defaults=defaults, stage_of=stage_of)


def describe_preset(name: str) -> str:
    """A preset's values per stage, as the `--print_preset` output and the README show them."""
    stages = load_preset(name)
    lines = [f"preset {name}: {stages['description']}"]
    for stage in (*STAGES, "predict"):
        values = ", ".join(f"{key}={value}" for key, value in sorted(stages[stage].items()))
        lines.append(f"  {stage}: {values}")
    return "\n".join(lines)
