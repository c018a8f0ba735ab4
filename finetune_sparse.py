"""Fine-tune the Bayesian sparse transformer on labelled single-cell data (one stage), or run the whole pipeline.

Stage A (no --bayes_head): deterministic encoder + head, from scratch or from a pretrained encoder (--model_path).
Stage B round 1 (--bayes_head, --model_path = a Stage A run): Bayesian fc1/fc2 ported from the Stage A means,
pre-warm epochs, annealed KL, Monte Carlo validation. Round 2 (--model_path = a Bayesian run, --prune_target > 0):
progressive structured pruning, each level kept while the pruned model predicts like the unpruned one.
--preset demo|full fills in a stage's tuned values (presets/*.json); options you give win.
`finetune_sparse.py pipeline --preset demo` runs Stage A -> B1 -> B2 and continues where it stopped.
Multi-GPU: torchrun --nproc_per_node N finetune_sparse.py ...; --resume continues a killed run.
"""

# Reading order: options.py turns the command line into one frozen TrainConfig; `run` locks the run directory, reads
# and checks every input, then `fit_fold` takes each fold through its PHASES (train_phase -> prune_phase ->
# final_phase), which call `train_epoch` and `evaluate`; checkpoints, the metrics CSV and the log are written around
# them, never inside, and the manifest last.

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import classification_report
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm.auto import tqdm

import allocator
import options
from backed_dataset import (
    BackedMatrix,
    align_columns,
    backed_decision,
    binned_dataset,
    load_backed_dataset,
    quantile_binning,
)
from bayesian_sparse_transformer import (
    PRUNABLE_LAYERS,
    BayesianSparseTransformer,
    HeadConfig,
    ModelConfig,
    head_noise_for_widths,
    predict_proba_samples,
    slice_head_noise,
    unit_widths,
)
from binning import Binning
from checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_from_payload,
    checkpoint_paths,
    load_checkpoint,
    load_ensemble,
    load_gene_vectors,
    load_pretrained_encoder,
    read_checkpoint_file,
    save_checkpoint,
)
from directory_lock import STAGING_PREFIX, locked, swap_in
from novelty import (
    INPUT_VIEWS,
    NOVELTY_LAYER,
    NOVELTY_NEIGHBOURS,
    calibrate_novelty,
    collect_features,
    expression_bins,
    fit_input_neighbours,
    fit_novelty,
    fit_training_cells,
    novelty_parts,
)
from options import TrainConfig, with_changes
from performer_pytorch import PerformerConfig
from progress import interactive, time_left
from run_manifest import (
    MANIFEST,
    config_files,
    data_fingerprint,
    ensemble_temperature,
    fingerprint_changes,
    mark_incomplete,
    read_run,
    write_manifest,
)
from utils import (
    ExpressionData,
    OutputError,
    UserError,
    atomic_write,
    autocast,
    check_training_labels,
    classification_metrics,
    collate_batch,
    dataset_from_anndata,
    encode_labels,
    fit_temperature,
    load_dataset,
    package_versions,
    paired_comparison,
    read_json,
    resolve_device,
    run_cli,
    set_seed,
    stratified_splits,
    tempered,
    write_json,
)

log = logging.getLogger("finetune")

DEFAULT_BIN_NUM = 5  # scBERT's
DEFAULT_BIN_WIDTH = 1.0  # scBERT's
DEFAULT_QUANTILE_BINS = 28  # the demo preset's count, chosen with width bins (benchmarks/accuracy_calibration.py)
# Validation metrics that choose the best checkpoint, each as a score where higher is better.
SELECTION_METRICS = {"nll": lambda metrics: -metrics["nll"], "macro_f1": lambda metrics: metrics["macro_f1"]}
BLOCK_CELLS = 1024  # cells whose tokens or gene features the novelty fit holds at once (see `blocks`)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def build_parser(description: str = __doc__, **defaults) -> argparse.ArgumentParser:
    """The command line, generated from TrainConfig's fields; `defaults` override (finetune_updated.py)."""
    return options.build_parser(TrainConfig, description, defaults=defaults)


def stage_of(values: dict) -> str:
    """The preset stage a run is: --stage if given; else A from scratch (or from a foreign encoder), B2 when
    --model_path is a Bayesian model (round 2 continues pruning), B1 from a deterministic one."""
    if values.get("stage"):
        return values["stage"]
    path = values.get("model_path")
    return "A" if not path else {"none": "A", "deterministic": "B1", "bayesian": "B2"}[model_kind(path)]


def default_config(**given) -> TrainConfig:
    """The configuration of `given` options by name (the Python API's way to a config): the same conversion and
    checks as the command line, a preset's values where `preset=` names one."""
    return options.make(TrainConfig, given, stage_of=stage_of)


# --------------------------------------------------------------------------------------------------------------
# Distributed setup and output files
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False  # a process group exists (every torchrun launch, one process included)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU), also with one process,
    so that `torchrun --nproc_per_node 1` runs the DistributedDataParallel path (benchmarks/gpu_check.py)."""
    if "RANK" not in os.environ:
        return Dist(), resolve_device(device_name)
    ctx = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")), True)
    device = resolve_device(device_name, local_rank=ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


@dataclass
class RunFiles:
    directory: Path
    name: str

    def fold(self, fold: int, suffix: str) -> Path:
        return self.directory / f"{self.name}{fold}_{suffix}"

    @property
    def config(self) -> Path:
        return self.directory / f"{self.name}_config.json"

    @property
    def summary(self) -> Path:
        return self.directory / f"{self.name}_summary.json"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def outputs(self, folds: int) -> list[Path]:
        """Every file a run with this many folds writes."""
        paths = [self.directory / MANIFEST, self.config, self.summary, self.log]
        for fold in range(folds):
            suffixes = ("best.pth", "last.pth", "metrics.csv", "val_cells.txt", "val_predictions.csv")
            paths += [self.fold(fold, s) for s in suffixes]
        return paths

    def existing(self, folds: int) -> list[Path]:
        return [path for path in self.outputs(folds) if path.exists()]


def check_directory_path(directory: Path) -> None:
    """--ckpt_dir must be creatable: no file where it or a folder above it should be."""
    for folder in (directory, *directory.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--ckpt_dir {directory} cannot be created: {folder} is a file; choose another --ckpt_dir")
            break


def check_one_run(directory: Path, name: str) -> None:
    """A run directory holds one run: another run's name there is refused."""
    others = sorted(set(config_files(directory)) - {name}) if directory.is_dir() else []
    if others:
        raise UserError(f"{directory} already holds the run {others[0]!r}; a run directory holds one run: choose "
                        "another --ckpt_dir")


def check_outputs(config: TrainConfig, files: RunFiles) -> list[Path]:
    """Refuse to clobber an earlier run or to share its directory; on --resume insist on the same settings.
    Writes nothing."""
    check_one_run(files.directory, config.model_name)
    existing = files.existing(config.cv_splits)
    if config.resume:
        if not files.config.exists():
            raise UserError(f"nothing to resume: {files.config} does not exist; run without --resume")
        saved = {k: v for k, v in read_json(files.config)["args"].items() if k not in TrainConfig.RUNTIME}
        settings = {k: v for k, v in config.as_dict().items() if k not in TrainConfig.RUNTIME}
        changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
        if changed:
            differences = ", ".join(f"{k} (interrupted run: {saved.get(k)!r}, now: {settings.get(k)!r})" for k in changed)
            raise UserError(f"--resume needs the settings of the interrupted run; these differ: {differences}")
    elif existing and not config.overwrite:
        raise UserError(f"{existing[0]} exists from an earlier run; pass --overwrite, --resume or another --ckpt_dir")
    return existing


def check_resumed_data(config: TrainConfig, files: RunFiles, fingerprint: dict) -> None:
    """--resume continues training on the very cells the run started with: a changed input is refused."""
    if not config.resume:
        return
    saved = read_json(files.config).get("data_fingerprint")
    changes = fingerprint_changes(saved or {}, fingerprint)
    if changes:
        raise UserError(f"--resume: the training data changed since the run started ({', '.join(changes)}); resume "
                        "with the original data, or start over with --overwrite")


def create_outputs(config: TrainConfig, files: RunFiles, ctx: Dist, existing: list[Path], fingerprint: dict) -> None:
    """Only once every input has been checked: create the run directory and record the configuration."""
    if ctx.main:
        files.directory.mkdir(parents=True, exist_ok=True)
        mark_incomplete(files.directory)  # from here on the directory is an unfinished run until the manifest says so
        if config.overwrite:
            for path in existing:
                path.unlink(missing_ok=True)
        # A kill during an atomic write leaves its temporary file (.tmp-<target>-<random>) behind; remove this
        # run's, which hold nothing it still needs, and leave other runs' alone.
        ours = {path.name for path in files.outputs(config.cv_splits)}
        for leftover in files.directory.glob(".tmp-*"):
            if leftover.name[len(".tmp-"):].rsplit("-", 1)[0] in ours:
                leftover.unlink(missing_ok=True)
        if not config.resume:
            write_json(files.config, {"args": config.as_dict(), "data_fingerprint": fingerprint,
                                      "versions": package_versions()})
    if ctx.distributed:
        dist.barrier()


def setup_logging(files: RunFiles, ctx: Dist, verbose: bool = True) -> None:
    """The run's log: the console (unless not `verbose`), and on the main process CKPT_DIR/MODEL_NAME.log;
    `close_logging` ends it."""
    log.setLevel(logging.INFO if ctx.main else logging.WARNING)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)] if verbose else []
    if ctx.main:
        handlers.append(RunLogFile(files.log))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)


class RunLogFile(logging.FileHandler):
    """The run's log file; a write that fails (a full disk) stops the run with one line instead of logging's own
    traceback, and the checkpoints written so far stay for --resume."""

    def __init__(self, path: Path):
        try:
            super().__init__(path, encoding="utf-8")
        except OSError as err:
            raise OutputError(path, err) from err

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        raise OutputError(self.baseFilename, error if isinstance(error, OSError) else OSError(str(error)))

    def close(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes; on a full disk the error was already reported
            super().close()


def close_logging() -> None:
    """Detach the run's handlers and close its log file when the run ends, so that an in-process caller (a notebook,
    a benchmark) keeps no open file and its next run logs only to its own."""
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()


# --------------------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """What --model_path provided: one of our checkpoints (genes, classes, model) or nothing / a foreign encoder.

    With `new_head`, only the checkpoint's encoder is reused and the head starts fresh for the data's cell types
    (Stage A on new types from one of our models, as from scBERT's pretrained encoder).
    """

    checkpoint: object | None = None  # bayesian_sparse_transformer.Checkpoint
    gene_vectors: torch.Tensor | None = None  # gene2vec table for a fresh model
    encoder_payload: dict | None = None  # a foreign (scBERT) checkpoint's content, read once for every fold
    new_head: bool = False

    @property
    def genes(self) -> list[str] | None:
        return self.checkpoint.genes if self.checkpoint else None

    @property
    def classes(self) -> list[str] | None:
        return self.checkpoint.classes if self.checkpoint and not self.new_head else None

    @property
    def continues_model(self) -> bool:
        """Training continues the checkpoint's whole model (Stage B, round 2, more Stage A)."""
        return self.checkpoint is not None and not self.new_head

    @property
    def pretrained_encoder(self) -> bool:
        """Only an encoder is reused (scBERT's, or ours with a new head): scBERT fine-tunes its last block."""
        return not self.continues_model

    @property
    def prune_amount(self) -> float:
        return float(self.checkpoint.metrics.get("prune_amount", 0.0)) if self.continues_model else 0.0

    @property
    def kl_step(self) -> int:
        """Where the source's KL annealing stopped: round 2 continues it instead of starting from zero again."""
        return int(self.checkpoint.metrics.get("kl_step", 0)) if self.continues_model else 0


def read_sources(config: TrainConfig) -> list[Source]:
    """Load --model_path once: our checkpoints carry genes/classes that the data must be aligned to.

    A run directory of K fold models gives one source per fold: fold k continues member k, on the same folds
    (same --seed and --cv_splits), so every member is still validated on cells it never trained on.
    """
    if not config.model_path:
        return [Source()]
    paths = checkpoint_paths(config.model_path, purpose="continue it")
    if len(paths) > 1:
        if len(paths) != config.cv_splits:
            raise UserError(f"--model_path {config.model_path} holds {len(paths)} fold models; pass --cv_splits {len(paths)} "
                            "so that each fold continues its own model")
        members = load_ensemble(config.model_path, purpose="continue it")
        for member in members:
            if (member.args.get("seed"), member.args.get("cv_splits")) != (config.seed, config.cv_splits):
                raise UserError(f"the fold models in {config.model_path} were trained with --seed {member.args.get('seed')} "
                                f"--cv_splits {member.args.get('cv_splits')}; continue them with the same values so each "
                                "fold keeps its validation cells")
        return [Source(member) for member in members]
    payload = read_checkpoint_file(paths[0])
    if payload.get("format") == CHECKPOINT_FORMAT:
        return [Source(checkpoint_from_payload(paths[0], payload))]
    return [Source(encoder_payload=payload)]  # a scBERT encoder: loaded into each fold's fresh model by build_model


def adopt_checkpoint_binning(config: TrainConfig, source: Source) -> TrainConfig:
    """The config with its binning resolved: our checkpoints fix the binning along with the architecture, so
    --binning/--bin_num/--bin_width may only repeat it. Without one: quantile bins, unless scBERT's encoder (whose
    token embeddings learned scBERT's bins) or --bin_width asks for width bins."""
    if source.checkpoint is not None:
        saved = source.checkpoint.binning
        for name, value in {"binning": saved.kind, "bin_num": saved.bin_num, "bin_width": saved.bin_width}.items():
            given = getattr(config, name)
            if given is not None and given != value:
                raise UserError(f"--{name} {given} differs from the checkpoint's {value}; "
                                f"drop --{name} to keep the binning the model was trained with")
        return with_changes(config, binning=saved.kind, bin_num=saved.bin_num,
                            bin_width=saved.bin_width if saved.kind == "width" else None)
    kind = config.binning or ("width" if source.encoder_payload is not None or config.bin_width is not None else "quantile")
    if kind == "width":
        return with_changes(config, binning=kind, bin_num=config.bin_num or DEFAULT_BIN_NUM,
                            bin_width=config.bin_width or DEFAULT_BIN_WIDTH)
    return with_changes(config, binning=kind, bin_num=config.bin_num or DEFAULT_QUANTILE_BINS)


def run_binning(config: TrainConfig, source: Source, matrix: sp.csr_matrix) -> Binning:
    """The binning of the run's models: a continued checkpoint's, width bins, or quantile bins of this run's cells
    (all of them: the cut points use no labels, and every fold model of an ensemble must share them)."""
    if source.checkpoint is not None:
        return source.checkpoint.binning
    if config.binning == "width":
        return Binning(config.bin_num, config.bin_width)
    binning = quantile_binning(matrix, config.bin_num, seed=config.seed)
    log.info("binning: %s", binning.describe())
    return binning


def check_fixed_options(config: TrainConfig, source: Source) -> None:
    """Our checkpoint fixes its encoder's architecture, and when training continues its whole model also the head
    (and a Bayesian head's variational family): options given on the command line that contradict it would be
    silently ignored, so they are refused."""
    if source.checkpoint is None:
        return
    saved = source.checkpoint.model.config
    if config.gene2vec_path is not None or ("pos_embed" in config.given and not config.pos_embed):
        flag = "--gene2vec_path" if config.gene2vec_path is not None else "--no_pos_embed"
        raise UserError(f"{config.model_path} brings its own gene embedding ({saved.encoder.gene_embedding}), part of "
                        f"its encoder's weights; drop {flag}")
    fixed = {"dim": saved.encoder.dim, "depth": saved.encoder.depth, "heads": saved.encoder.heads,
             "dim_head": saved.encoder.dim_head, "local_attn_heads": saved.encoder.local_attn_heads,
             "nb_features": saved.encoder.nb_features, "feature_redraw_interval": saved.encoder.feature_redraw_interval}
    if source.continues_model:
        fixed |= {"h_dim": saved.head.base_hidden2, "dropout": saved.head.dropout}
    if source.continues_model and saved.head.bayes:
        fixed |= {"prior_sigma": saved.head.prior_sigma, "init_log_sigma": saved.head.init_log_sigma,
                  "local_reparam": saved.head.local_reparam}
    given = sorted(name for name, value in fixed.items() if name in config.given and getattr(config, name) != value)
    if given:
        settings = ", ".join(f"--{name} {'(default)' if fixed[name] is None else fixed[name]}" for name in given)
        raise UserError(f"{config.model_path} fixes {settings}; drop {', '.join('--' + n for n in given)} (they cannot "
                        "change when training continues a checkpoint or reuses its encoder)")


def build_model(config: TrainConfig, source: Source, genes: list[str], n_classes: int) -> BayesianSparseTransformer:
    """A fresh model, or a copy of the source checkpoint's model; Bayesian head ported when --bayes_head."""
    if source.continues_model:
        # Training starts uncalibrated: a temperature fitted to the source's validation cells is refitted at the end.
        model_config = replace(source.checkpoint.model.config, head=replace(
            source.checkpoint.model.config.head, temperature=1.0, posterior_means=False))
        model_config.encoder = replace(model_config.encoder, gradient_checkpointing=config.gradient_checkpointing)  # this run's choice
        model = BayesianSparseTransformer(model_config)
        model.load_state_dict(source.checkpoint.model.state_dict())
    elif source.checkpoint is not None:  # our encoder, a fresh head for the data's cell types
        encoder = replace(source.checkpoint.model.config.encoder, gradient_checkpointing=config.gradient_checkpointing)
        head = HeadConfig(seq_len=encoder.max_seq_len, dim=encoder.dim, num_classes=n_classes, hidden2=config.h_dim,
                          dropout=config.dropout)
        model = BayesianSparseTransformer(ModelConfig(encoder, head))
        model.encoder.load_state_dict(source.checkpoint.model.encoder.state_dict())
        log.info("reusing the encoder of %s with a new head for %d cell types", config.model_path, n_classes)
    else:
        seq_len = len(genes) + 1
        gene_embedding = "none" if not config.pos_embed else ("gene2vec" if config.gene2vec_path else "learned")
        encoder = PerformerConfig(
            num_tokens=config.bin_num + 2, max_seq_len=seq_len, dim=config.dim, depth=config.depth, heads=config.heads,
            dim_head=config.dim_head, nb_features=config.nb_features, feature_redraw_interval=config.feature_redraw_interval,
            local_attn_heads=config.local_attn_heads, ff_dropout=config.dropout, gene_embedding=gene_embedding,
            redraw_seed=config.seed, gradient_checkpointing=config.gradient_checkpointing,
        )
        head = HeadConfig(seq_len=seq_len, dim=config.dim, num_classes=n_classes, hidden2=config.h_dim, dropout=config.dropout)
        model = BayesianSparseTransformer(ModelConfig(encoder, head), gene_vectors=source.gene_vectors)
        if config.model_path:
            for note in load_pretrained_encoder(model, config.model_path, source.encoder_payload):
                log.info(note)
    if config.bayes_head and not model.is_bayesian:
        model.to_bayesian(prior_sigma=config.prior_sigma, init_log_sigma=config.init_log_sigma, local_reparam=config.local_reparam)
        log.info("ported fc1/fc2 to Bayesian layers (means = trained weights, sigma = exp(%.1f))", config.init_log_sigma)
    return model


def freeze_encoder_layers(model: BayesianSparseTransformer, trainable_layers: int | None, pretrained: bool) -> None:
    """Train only the last N encoder blocks, the final norm and the head (scBERT fine-tunes its last block)."""
    if trainable_layers is None:
        trainable_layers = 1 if pretrained else -1
    if trainable_layers < 0:
        return
    encoder = model.encoder
    for param in encoder.parameters():
        param.requires_grad_(False)
    blocks = list(encoder.layers)
    for block in blocks[max(len(blocks) - trainable_layers, 0):] if trainable_layers else []:
        block.requires_grad_(True)  # N >= depth trains every block (the embeddings stay fixed)
    encoder.norm.requires_grad_(True)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def class_weights(train_labels: np.ndarray, n_classes: int, scheme: str) -> torch.Tensor:
    """Cross-entropy weights (classes,): balanced n / (C * n_c) or all ones; absent classes weigh nothing."""
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64)
    if scheme == "balanced":
        weights = counts.sum() / (n_classes * np.maximum(counts, 1))
    else:
        weights = np.ones(n_classes)
    return torch.tensor(np.where(counts > 0, weights, 0.0), dtype=torch.float32)


def shuffle_seed(seed: int, fold: int, pruning: bool, level: int, epoch: int) -> int:
    """A 32-bit seed for one epoch's shuffle, distinct for every (seed, fold, phase, pruning level, epoch)."""
    return int(np.random.SeedSequence([seed, fold, int(pruning), level, epoch]).generate_state(1)[0])


def make_optimizer(model: BayesianSparseTransformer, config: TrainConfig, total_steps: int):
    """AdamW (Adam when weight decay is 0) with a head learning-rate multiplier; warm-up then cosine decay.

    Weight decay applies to weight matrices and means only: decaying log-sigmas would widen the posterior, and
    biases and norms are conventionally left alone.
    """
    groups = []
    for module, lr in ((model.head, config.learning_rate * config.head_lr_mult), (model.encoder, config.learning_rate)):
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        decayed = [p for name, p in named if p.dim() >= 2 and "log_sigma" not in name]
        kept = [p for name, p in named if not (p.dim() >= 2 and "log_sigma" not in name)]
        groups += [{"params": params, "lr": lr, "weight_decay": wd}
                   for params, wd in ((decayed, config.weight_decay), (kept, 0.0)) if params]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    total_steps = max(total_steps, 1)
    warmup = int(config.warmup_ratio * total_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
    if warmup == 0:
        return optimizer, cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


# A fold's phases in order; its `last` checkpoint records the one it is in, and --resume starts there.
PHASES = ("train", "prune", "final", "done")


@dataclass
class FoldState:
    """Where a fold stands; saved in the `last` checkpoint so --resume continues exactly here."""

    phase: str = "train"  # one of PHASES
    epoch: int = 0  # next epoch within the phase (within the current prune level)
    level_index: int = 0  # next pruning level
    level_applied: bool = False  # the current level's prune is done, its fine-tuning may be under way
    kl_step: int = 0
    best_score: float = -math.inf  # SELECTION_METRICS[--select_metric] of the best checkpoint
    reference_f1: float | None = None  # macro-F1 before pruning, the bar for --prune_f1_tol
    reference_probs: list | None = None  # (validation cells, classes) before pruning, the paired rule's reference
    reference_calls: list | None = None  # validation cells' types by the posterior means before pruning
    # The unit widths before pruning and where the current units sit among them (physical pruning shrinks the
    # layers): the paired rule draws the pruned model's noise as the unpruned model's, restricted to these.
    reference_widths: dict | None = None
    reference_positions: dict | None = None
    teacher_probs: torch.Tensor | None = None  # (cells, classes) of the unpruned model, --prune_distill's targets
    # Continued models: the validation probabilities of the model the chain of runs started from (Stage A's for
    # both Stage B rounds), the bar that keeping Stage B's head and every pruning level is held to.
    origin_probs: list | None = None
    origin_accuracy: float | None = None
    kept: str = "trained"  # what the best checkpoint is: "start" (the continued model), "sampled" or "means"
    bad_rounds: int = 0
    prune_amount: float = 0.0  # last accepted pruning level (fraction of each layer's original slices removed)
    total_steps: int = 1  # optimizer steps the current learning-rate schedule spans
    history: list = field(default_factory=list)
    result: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunSetup:
    """What every fold of a run shares: the settings, this process's place in the job, the output files and the
    labelled data (its matrix in memory, or a BackedMatrix on disk with --backed)."""

    config: TrainConfig
    ctx: Dist
    device: torch.device
    files: RunFiles
    data: ExpressionData
    labels: np.ndarray  # (cells,) class indices
    classes: list[str]
    binning: Binning


@dataclass(frozen=True)
class Fold:
    """One fold: its training and validation cells and the model it starts from."""

    run: RunSetup
    index: int
    train_set: Subset  # of a dataset whose label slot carries each cell's row: batches find labels by row
    val_idx: np.ndarray  # sorted: validation outputs in data order, however many processes share the work
    source: Source
    class_weights: torch.Tensor  # (classes,) of the loss, on the device
    bayes: bool  # a Bayesian head (--bayes_head, or a continued Bayesian checkpoint)


def make_fold(run: RunSetup, index: int, train_idx: np.ndarray, val_idx: np.ndarray, source: Source) -> Fold:
    config = run.config
    dataset = binned_dataset(run.data.matrix, run.binning, np.arange(len(run.labels)))
    weights = class_weights(run.labels[train_idx], len(run.classes), config.class_weight).to(run.device)
    bayes = config.bayes_head or (source.continues_model and source.checkpoint.model.is_bayesian)
    return Fold(run, index, Subset(dataset, train_idx), np.sort(val_idx), source, weights, bayes)


@dataclass
class Training:
    """The model being trained and what updates it (optimizer, learning-rate schedule, gradient scaler), with its
    DistributedDataParallel wrapper under torchrun."""

    model: BayesianSparseTransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ddp: DistributedDataParallel | None


def attach(fold: Fold, state: FoldState, model: BayesianSparseTransformer, total_steps: int) -> Training:
    """Train `model` from here: freeze what --trainable_layers keeps fixed, a new optimizer and a schedule over
    `total_steps` (kept in the state, so --resume rebuilds the same schedule), DDP."""
    config, device = fold.run.config, fold.run.device
    pretrained = bool(config.model_path) and fold.source.pretrained_encoder
    freeze_encoder_layers(model, config.trainable_layers, pretrained=pretrained)
    state.total_steps = total_steps
    model = model.to(device)
    optimizer, scheduler = make_optimizer(model, config, total_steps)
    ddp = None
    if fold.run.ctx.distributed:
        # Pre-warm epochs leave the sigmas without gradients: DDP must not wait for them.
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=model.is_bayesian)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    return Training(model, optimizer, scheduler, scaler, ddp)


def kl_scale(config: TrainConfig, step: int, train_cells: int) -> float:
    """The KL weight at optimizer step `step`: linear annealing that continues across rounds (the step is saved)."""
    final = 1.0 / train_cells if config.kl_weight == "elbo" else config.kl_weight
    if not config.kl_anneal_steps:
        return final
    return final * min(1.0, step / config.kl_anneal_steps)


def prune_levels(start: float, target: float, step: float) -> list[float]:
    """The pruning levels from `start` (a continued model's) up to `target` in steps of `step`."""
    levels, level = [], start
    while level + 1e-9 < target:
        level = min(round(level + step, 6), target)
        levels.append(level)
    return levels


def steps_per_epoch(fold: Fold) -> int:
    config, world = fold.run.config, fold.run.ctx.world
    per_rank = math.ceil(len(fold.train_set) / world)
    return math.ceil(math.ceil(per_rank / config.batch_size) / config.grad_acc)


def train_loader(fold: Fold, state: FoldState, epoch: int) -> DataLoader:
    config, ctx = fold.run.config, fold.run.ctx
    # Shuffling is seeded by where training stands, so a resumed run sees the same batches as an uninterrupted one.
    seed = shuffle_seed(config.seed, fold.index, state.phase == "prune", state.level_index, epoch)
    if config.sample_with_replacement:
        # scBERT's loader: random cells with replacement; each rank draws its share from its own stream.
        generator = torch.Generator().manual_seed(seed * 1009 + ctx.rank)
        share = math.ceil(len(fold.train_set) / ctx.world)
        sampler = RandomSampler(fold.train_set, replacement=True, num_samples=share, generator=generator)
    elif ctx.distributed:
        sampler = DistributedSampler(fold.train_set, ctx.world, ctx.rank, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(fold.train_set, generator=torch.Generator().manual_seed(seed))
    return DataLoader(fold.train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collate_batch,
                      num_workers=config.num_workers)


def train_epoch(fold: Fold, training: Training, state: FoldState, epoch: int, deterministic: bool) -> dict:
    """One pass over the training cells with an optimizer step every --grad_acc micro-batches; returns the mean
    cross-entropy and accuracy over all processes and the last KL divergence."""
    config, device, model = fold.run.config, fold.run.device, training.model
    model.train()
    model.set_deterministic(deterministic)
    loader = train_loader(fold, state, epoch)
    labels_by_row = torch.as_tensor(np.asarray(fold.run.labels, dtype=np.int64))
    total_loss = correct = seen = kl_value = 0.0
    n_batches = len(loader)
    bar = tqdm(loader, desc=f"fold {fold.index} epoch {epoch + 1}", disable=not (fold.run.ctx.main and fold.run.config.verbose and interactive()), leave=False)
    training.optimizer.zero_grad(set_to_none=True)
    for i, (tokens, rows) in enumerate(bar):
        tokens, labels = tokens.to(device), labels_by_row[rows].to(device)
        last_of_step = (i + 1) % config.grad_acc == 0 or i + 1 == n_batches
        # The last step of an epoch may gather fewer micro-batches: average over those it has.
        group_size = min(config.grad_acc, n_batches - (i // config.grad_acc) * config.grad_acc)
        sync = training.ddp.no_sync() if training.ddp is not None and not last_of_step else contextlib.nullcontext()
        with sync, autocast(device, config.amp):
            ce, loss, logits, kl = batch_loss(fold, training, state, tokens, labels, rows, deterministic)
            training.scaler.scale(loss / group_size).backward()
        kl_value = kl if kl is not None else kl_value
        if last_of_step:
            optimizer_step(training, config.grad_clip)
            if model.is_bayesian and not deterministic:
                state.kl_step += 1
        total_loss += float(ce.detach()) * len(labels)
        correct += float((logits.argmax(-1) == labels).sum())
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    stats = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=device)
    if fold.run.ctx.distributed:
        dist.all_reduce(stats)
    return {"train_loss": float(stats[0] / stats[2]), "train_acc": float(stats[1] / stats[2]), "kl": kl_value}


def batch_loss(fold: Fold, training: Training, state: FoldState, tokens: torch.Tensor, labels: torch.Tensor,
               rows: torch.Tensor, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
    """One micro-batch: (cross-entropy, loss, logits (batch, classes) averaged over head samples, KL divergence or
    None). The loss adds the annealed KL term of a sampled Bayesian head and the --l1_lambda/--group_lasso penalties."""
    config, model = fold.run.config, training.model
    forward = training.ddp or model
    if model.is_bayesian and not deterministic and config.mc_samples > 1:
        logits = forward(tokens, noise=model.head.draw_noise(config.mc_samples))  # (S, batch, classes)
    else:
        logits = forward(tokens).unsqueeze(0)
    ce, loss = data_loss(logits, labels, fold.class_weights, state.teacher_probs, rows, config.prune_distill)
    kl_value = None
    if model.is_bayesian and not deterministic and config.kl_weight != 0:
        kl = model.kl_divergence()
        kl_value = float(kl.detach())
        # Each micro-batch carries the full KL; dividing by the group size makes it once per step.
        loss = loss + kl_scale(config, state.kl_step, len(fold.train_set)) * kl
    if config.l1_lambda > 0:
        loss = loss + config.l1_lambda * sum(getattr(model.head, n).mean_weight().abs().sum() for n in PRUNABLE_LAYERS)
    if config.group_lasso > 0:
        loss = loss + config.group_lasso * model.group_norm(config.layers_to_prune, dim=config.prune_dim)
    return ce, loss, logits.mean(0), kl_value


def data_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, teacher: torch.Tensor | None,
              rows: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, loss) of logits (samples, batch, classes), averaged over samples.

    The loss is the class-weighted cross-entropy, mixed while a pruned model is fine-tuned with --prune_distill
    (a `teacher`, (cells, classes) indexed by `rows`) with the KL divergence from the unpruned model's
    probabilities: a pruned head learns to predict what the full one did, not to refit the labels.
    """
    num_samples, _, num_classes = logits.shape
    log_probs = F.log_softmax(logits.float(), dim=-1).reshape(-1, num_classes)
    ce = F.nll_loss(log_probs, labels.repeat(num_samples), weight=weight)
    if teacher is None or alpha == 0:
        return ce, ce
    teacher = teacher[rows].to(log_probs.device).repeat(num_samples, 1)
    distill = F.kl_div(log_probs, teacher, reduction="batchmean")
    return ce, (1 - alpha) * ce + alpha * distill


def optimizer_step(training: Training, grad_clip: float) -> None:
    if grad_clip > 0:
        training.scaler.unscale_(training.optimizer)
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), grad_clip)
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.optimizer.zero_grad(set_to_none=True)
    training.scheduler.step()


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def evaluate(fold: Fold, model: BayesianSparseTransformer, samples: int | None = None,
             noise: dict | None = None) -> tuple[dict, np.ndarray]:
    """MC validation over the whole validation set exactly once (ranks take disjoint shards, no padding).

    Returns the metrics of the mean probabilities and the probability samples (S, validation cells, classes).
    """
    ctx = fold.run.ctx
    shard = fold.val_idx[ctx.rank :: ctx.world]
    prob_samples = predict_rows(fold, model, shard, samples, noise)
    if ctx.distributed:
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, (shard, prob_samples))
        order = np.concatenate([g[0] for g in gathered])
        prob_samples = np.concatenate([g[1] for g in gathered], axis=1)[:, np.argsort(order)]
    metrics = classification_metrics(prob_samples.mean(0), fold.run.labels[fold.val_idx], fold.run.classes)
    return metrics, prob_samples


def predict_rows(fold: Fold, model: BayesianSparseTransformer, rows: np.ndarray, samples: int | None = None,
                 noise: dict | None = None) -> np.ndarray:
    """Probability samples (S, len(rows), classes) of `model`, as validation draws them (S = 1: the posterior
    means; `noise`: these S head draws)."""
    config = fold.run.config
    loader = DataLoader(Subset(fold.train_set.dataset, rows), batch_size=max(config.batch_size, 16), collate_fn=collate_batch)
    samples = samples or (config.mc_samples_eval if model.is_bayesian else 1)
    model.set_deterministic(samples == 1)  # one sample means the posterior means, as in prediction
    return predict_proba_samples(model, loader, samples, seed=config.seed, noise=noise, device=fold.run.device, amp=config.amp)


def evaluate_paired(fold: Fold, model: BayesianSparseTransformer, state: FoldState) -> dict[str, tuple[dict, np.ndarray]]:
    """`evaluate_modes` with the unpruned model's noise restricted to the kept units (common random numbers), what
    the paired rule compares."""
    if not model.is_bayesian:
        return evaluate_modes(fold, model)
    noise = head_noise_for_widths(state.reference_widths, fold.run.config.mc_samples_eval, fold.run.config.seed)
    positions = {unit: torch.as_tensor(kept) for unit, kept in state.reference_positions.items()}
    return evaluate_modes(fold, model, slice_head_noise(noise, positions))


def evaluate_modes(fold: Fold, model: BayesianSparseTransformer, noise: dict | None = None) -> dict[str, tuple[dict, np.ndarray]]:
    """Validation metrics and mean probabilities (cells, classes) of each way the model can predict, from one
    encoding of the validation cells: a deterministic head's one ("trained"); a Bayesian head's --mc_samples_eval
    draws ("sampled", `noise` or drawn from --seed) and its posterior means ("means": one extra all-zero draw)."""
    config, device = fold.run.config, fold.run.device
    if not model.is_bayesian:
        metrics, prob_samples = evaluate(fold, model)
        return {"trained": (metrics, prob_samples.mean(0))}
    samples = config.mc_samples_eval
    if noise is None:
        noise = model.head.draw_noise(samples, torch.Generator().manual_seed(config.seed))
    noise = {name: {k: torch.cat([v.cpu(), torch.zeros_like(v[:1].cpu())]).to(device) for k, v in draws.items()}
             for name, draws in noise.items()}
    _, prob_samples = evaluate(fold, model, samples=samples + 1, noise=noise)
    labels, classes = fold.run.labels[fold.val_idx], fold.run.classes
    return {mode: (classification_metrics(probs, labels, classes), probs)
            for mode, probs in (("sampled", prob_samples[:-1].mean(0)), ("means", prob_samples[-1]))}


def better_mode(config: TrainConfig, modes: dict[str, tuple[dict, np.ndarray]],
                state: FoldState | None = None) -> tuple[str, dict, np.ndarray] | None:
    """The mode of `evaluate_modes` with the better --select_metric (sampled on a tie): (mode, metrics, probs).

    With a `state` that has an origin, only modes whose validation accuracy is at least the origin's count (None
    if neither does): a better NLL bought with fewer correct calls than the start is not an improvement the user
    asked for."""
    eligible = [m for m in modes if state is None or state.origin_accuracy is None
                or modes[m][0]["accuracy"] >= state.origin_accuracy - 1e-9]
    if not eligible:
        return None
    mode = max(eligible, key=lambda m: SELECTION_METRICS[config.select_metric](modes[m][0]))
    return (mode, *modes[mode])


def validate_and_keep_best(fold: Fold, model: BayesianSparseTransformer, state: FoldState, row: dict) -> bool:
    """Validate, save the best model (a Bayesian head in the better of its two modes); True when early stopping
    says stop. A continued model's start is the first best: training replaces it only with a model that validates
    better (--select_metric), surely better in NLL (`surely_better`) and with no fewer correct calls."""
    config = fold.run.config
    modes = evaluate_modes(fold, model)
    chosen = better_mode(config, modes, state)
    if chosen is not None and not surely_better(fold, state, chosen[2]):
        chosen = None
    mode, metrics, _ = chosen or better_mode(config, modes)
    row.update(val_loss=metrics["nll"], val_acc=metrics["accuracy"], val_macro_f1=metrics["macro_f1"], val_ece=metrics["ece"])
    score = SELECTION_METRICS[config.select_metric](metrics)
    if chosen is not None and score > state.best_score:
        state.best_score = score
        state.bad_rounds = 0
        state.kept = mode
        save_best(fold, state, model, _summary_metrics(metrics, model, state.prune_amount, state.kl_step), mode=mode)
    else:
        state.bad_rounds += 1
    return state.bad_rounds >= config.patience


def surely_better(fold: Fold, state: FoldState, probs: np.ndarray) -> bool:
    """Whether a trained candidate's validation probabilities (cells, classes) beat the origin's surely enough to
    replace the model the runs started from: the 95 % upper bound of the paired per-cell NLL difference is below
    0. Without an origin (a model from scratch), any candidate may be kept."""
    if state.origin_probs is None:
        return True
    paired = paired_comparison(np.asarray(state.origin_probs), probs, fold.run.labels[fold.val_idx],
                               seed=fold.run.config.seed)
    return paired["nll_diff_upper"] < 0


def set_origin(fold: Fold, state: FoldState, model: BayesianSparseTransformer) -> None:
    """For a continued model: the origin's validation probabilities (carried in the checkpoint by an earlier Stage
    B round, else the continued model's own, as it predicts), and the continued model, in its better mode, as the
    first best model: Stage B replaces it only with a model that validates better."""
    carried = fold.source.checkpoint.origin
    if carried is not None and len(carried) == len(fold.val_idx):
        state.origin_probs = carried
    else:
        start = fold.source.checkpoint.model.to(fold.run.device)
        state.origin_probs = evaluate(fold, start)[1].mean(0).tolist()
    state.origin_accuracy = classification_metrics(np.asarray(state.origin_probs), fold.run.labels[fold.val_idx],
                                                   fold.run.classes)["accuracy"]
    modes = evaluate_modes(fold, model)
    mode, metrics, _ = better_mode(fold.run.config, modes, state) or better_mode(fold.run.config, modes)
    state.best_score, state.kept = SELECTION_METRICS[fold.run.config.select_metric](metrics), "start"
    save_best(fold, state, model, _summary_metrics(metrics, model, state.prune_amount, state.kl_step), mode=mode)
    log.info("fold %d: the model it continues: validation NLL %.3f, accuracy %.3f (%s); Stage B must beat it",
             fold.index, metrics["nll"], metrics["accuracy"], mode)


def teacher_probabilities(fold: Fold, model: BayesianSparseTransformer) -> torch.Tensor:
    """(cells, classes): the model's mean probabilities on the training cells (zeros elsewhere)."""
    rows = np.sort(np.asarray(fold.train_set.indices))
    teacher = torch.zeros(len(fold.run.labels), len(fold.run.classes))
    teacher[torch.from_numpy(rows)] = torch.from_numpy(predict_rows(fold, model, rows).mean(0)).float()
    return teacher


def calibrate(fold: Fold, model: BayesianSparseTransformer) -> None:
    """Fit the temperature of the kept model to the validation cells (from T = 1, so a resume refits the same)."""
    set_head(model, temperature=1.0)
    _, prob_samples = evaluate(fold, model)
    temperature = fit_temperature(prob_samples, fold.run.labels[fold.val_idx])
    set_head(model, temperature=temperature)
    log.info("fold %d: temperature %.3f fitted to %d validation cells", fold.index, temperature, len(fold.val_idx))


def set_head(model: BayesianSparseTransformer, **changes) -> None:
    """Change how the head predicts (temperature, posterior_means) without touching its weights."""
    model_config = model.config
    model_config.head = replace(model_config.head, **changes)
    model.head.config = model_config.head


def fold_novelty(fold: Fold, model: BayesianSparseTransformer, val_probs: np.ndarray) -> dict:
    """Novelty statistics of the final model (see `calibrate_novelty`): its training cells' class means and shrunk
    covariances in the head's features and in expression space, their fingerprints, a neighbour index of (up to
    NOVELTY_NEIGHBOURS of) them in expression space, and each view's scores on the validation cells (known types
    it never trained on) with the threshold that `--novelty_fpr` of them exceed. val_probs (validation cells,
    classes): the final model's probabilities.

    One random subset of up to NOVELTY_NEIGHBOURS training cells fits the principal axes of the head-feature and
    the expression views and is the neighbour index; every training cell counts in the class statistics, the
    other cells passing a block at a time, so that no cells x genes array of the whole training or validation set
    is built.
    """
    config, dataset, labels = fold.run.config, fold.train_set.dataset, fold.run.labels
    train_idx, val_idx = np.asarray(fold.train_set.indices), np.asarray(fold.val_idx)
    fit_started = time.time()
    log.info("fold %d: fitting novelty statistics on %d training cells", fold.index, len(train_idx))
    rng = np.random.default_rng(config.seed + fold.index)
    subset = np.sort(rng.choice(train_idx, min(len(train_idx), NOVELTY_NEIGHBOURS), replace=False))
    rest = np.setdiff1d(train_idx, subset)
    stats = fit_novelty(fold_features(fold, model, subset), labels[subset],
                        more=((fold_features(fold, model, rest[b]), labels[rest[b]]) for b in blocks(len(rest))))
    stats |= fit_training_cells(expression_bins(dataset.tokens(train_idx[b])) for b in blocks(len(train_idx)))
    if INPUT_VIEWS & set(config.novelty_parts):
        # bins are small integers: int16 until _principal_axes makes its one float64 copy
        bins = [expression_bins(dataset.tokens(subset[b])).astype(np.int16) for b in blocks(len(subset))]
        stats |= fit_input_neighbours(np.concatenate(bins), config.novelty_input_pcs, labels=labels[subset],
                                      more=((expression_bins(dataset.tokens(rest[b])), labels[rest[b]])
                                            for b in blocks(len(rest))))
    views = stats | {"parts": config.novelty_parts}
    parts = [novelty_parts(fold_features(fold, model, val_idx[b]), dataset.tokens(val_idx[b]), val_probs[b], views)
             for b in blocks(len(val_idx))]
    stats = calibrate_novelty(stats, {name: np.concatenate([p[name] for p in parts]) for name in config.novelty_parts},
                              config.novelty_fpr)
    log.info("fold %d: novelty threshold %.3f (%.0f%% of %d validation cells above it; views %s), fitted in %.0f s",
             fold.index, stats["threshold"], 100 * config.novelty_fpr, len(val_idx), "+".join(config.novelty_parts),
             time.time() - fit_started)
    return stats


def blocks(cells: int) -> Iterator[slice]:
    """Slices of BLOCK_CELLS cells covering `cells`: a block's int64 tokens or gene features are BLOCK_CELLS x genes
    x 8 (or 4) bytes, where all cells' at once would be 7 GB for Zheng68K's training cells (0.7 GB for a
    5,000-cell neighbour index)."""
    for start in range(0, cells, BLOCK_CELLS):
        yield slice(start, start + BLOCK_CELLS)


def fold_features(fold: Fold, model: BayesianSparseTransformer, rows: np.ndarray, layer: str = NOVELTY_LAYER) -> np.ndarray:
    """The head's features (len(rows), width) of `model`: `layer` as in `collect_features`."""
    config = fold.run.config
    loader = DataLoader(Subset(fold.train_set.dataset, rows), batch_size=max(config.batch_size, 16), collate_fn=collate_batch)
    return collect_features(model, loader, layer, device=fold.run.device, amp=config.amp)


# --------------------------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------------------------


def set_reference(fold: Fold, state: FoldState, model: BayesianSparseTransformer) -> None:
    """The bar for every pruning level: the origin's validation probabilities for a continued model (so the losses
    of Stage B and of every level add up against the model the user started from), else the unpruned model's; and
    the unpruned model's calls (the share of changed types) and, with --prune_distill, its training cells'
    probabilities (the fine-tuning targets). The unpruned model is saved as the best model if none was yet."""
    config = fold.run.config
    widths = unit_widths(model)
    state.reference_widths = widths
    state.reference_positions = {unit: list(range(width)) for unit, width in widths.items()}
    modes = evaluate_paired(fold, model, state)
    mode, metrics, probs = better_mode(config, modes, state) or better_mode(config, modes)
    reference = np.asarray(state.origin_probs) if state.origin_probs is not None else probs
    state.reference_probs = reference.tolist()
    state.reference_f1 = classification_metrics(reference, fold.run.labels[fold.val_idx], fold.run.classes)["macro_f1"]
    state.reference_calls = modes["means" if model.is_bayesian else "trained"][1].argmax(1).tolist()
    if config.prune_distill > 0:
        state.teacher_probs = teacher_probabilities(fold, model)
    state.best_score = max(state.best_score, SELECTION_METRICS[config.select_metric](metrics))
    start = fold.source.prune_amount
    if not fold.run.files.fold(fold.index, "best.pth").exists() and fold.run.ctx.main:
        save_best(fold, state, model, _summary_metrics(metrics, model, start, state.kl_step), mode=mode)
    bar = "the model the runs started from" if state.origin_probs is not None else "the unpruned model"
    log.info("fold %d: pruning from %.0f%% to %.0f%% (unpruned: validation NLL %.3f, macro-F1 %.3f; %s rule against "
             "%s)", fold.index, 100 * start, 100 * config.prune_target, metrics["nll"], metrics["macro_f1"],
             config.prune_rule, bar)


def prune_to(fold: Fold, state: FoldState, model: BayesianSparseTransformer, level: float,
             refit: tuple[torch.Tensor, torch.Tensor] | tuple[None, None] | None = None) -> Training:
    """Prune `model` to `level` (refitting the layer that reads the removed units) and start its fine-tuning.

    refit: `refit_cells` of an earlier model with the same encoder, used while its width still matches fc1's inputs.
    """
    config = fold.run.config
    features, weights = refit if refit is not None and _refit_matches(refit, model) else refit_cells(fold, model)
    stats = model.prune(level, layers=config.layers_to_prune, dim=config.prune_dim, mode=config.prune_mode,
                        score=config.prune_score, refit_features=features, refit_weights=weights,
                        refit_ridge=config.prune_refit_ridge)
    if config.prune_mode == "physical":  # mask mode keeps every unit in place
        for unit, keep in stats["kept"].items():
            positions = state.reference_positions[unit]
            state.reference_positions[unit] = [positions[i] for i in keep.tolist()]
    training = attach(fold, state, model, config.prune_ft_epochs * steps_per_epoch(fold))
    state.level_applied, state.epoch = True, 0
    log.info("fold %d: pruned to %.0f%% of %s slices (dim %d, %s): fc1+fc2 sparsity %.1f%%, %d parameters",
             fold.index, 100 * level, config.prune_layers, config.prune_dim, config.prune_mode,
             100 * stats["fc12_sparsity"], stats["total_params"])
    return training


def refit_cells(fold: Fold, model: BayesianSparseTransformer) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Gene features and class weights (the loss's) of a fixed subset of training cells for --prune_refit (the
    same cells at every level)."""
    config = fold.run.config
    if not config.prune_refit:
        return None, None
    rows = np.sort(np.asarray(fold.train_set.indices))
    if len(rows) > config.prune_refit_cells:
        rng = np.random.default_rng(config.seed + fold.index)
        rows = np.sort(rng.choice(rows, config.prune_refit_cells, replace=False))
    features = torch.from_numpy(fold_features(fold, model, rows, "gene_features")).to(fold.run.device)
    return features, fold.class_weights[torch.as_tensor(fold.run.labels[rows], device=fold.class_weights.device)]


def _refit_matches(refit: tuple[torch.Tensor, torch.Tensor] | tuple[None, None], model: BayesianSparseTransformer) -> bool:
    features = refit[0]
    return features is None or features.shape[1] == unit_widths(model)["inputs"]


def keep_pruned(config: TrainConfig, state: FoldState, labels: np.ndarray, metrics: dict, probs: np.ndarray,
                calls: np.ndarray) -> tuple[bool, str]:
    """Whether the pruned, fine-tuned model may replace the best one, and the numbers behind the verdict.

    labels: the validation cells' true types; probs: the pruned model's mean probabilities there (in the mode
    judged); calls: the types its posterior means predict there (the paired rule's agreement with the unpruned
    model). The loss is measured against `set_reference`'s bar: cumulative, never against the previous level.
    """
    if config.prune_rule == "f1":
        ok = metrics["macro_f1"] >= state.reference_f1 - config.prune_f1_tol
        return ok, f"val macro-F1 {metrics['macro_f1']:.3f} vs {state.reference_f1:.3f} (tolerance {config.prune_f1_tol})"
    # Agreement of the posterior means' calls: a deterministic comparison, free of the Monte Carlo noise that
    # changes a few percent of borderline calls between two draws of the same model.
    paired = paired_comparison(np.asarray(state.reference_probs), probs, labels, seed=config.seed,
                               calls=(np.asarray(state.reference_calls), np.asarray(calls)))
    ok = paired["nll_diff_upper"] <= config.prune_nll_tol and paired["changed"] <= config.prune_max_changed
    return ok, (f"val NLL {paired['nll_diff']:+.4f} per cell (95% upper bound {paired['nll_diff_upper']:+.4f}, "
                f"tolerance {config.prune_nll_tol}), {paired['changed']:.1%} of cells changed type "
                f"(tolerance {config.prune_max_changed:.0%})")


def judge_level(fold: Fold, state: FoldState, training: Training, level: float, n_levels: int, started: float) -> None:
    """Keep the fine-tuned pruning level (in the better of its modes) as the best model, or stop pruning at the
    one before."""
    config, model = fold.run.config, training.model
    modes = evaluate_paired(fold, model, state)
    # The paired rule also asks for no fewer correct calls than the origin; --prune_rule f1 has its own tolerance.
    chosen = better_mode(config, modes, state if config.prune_rule == "paired" else None)
    mode, metrics, probs = chosen or better_mode(config, modes)
    calls = modes["means" if model.is_bayesian else "trained"][1].argmax(1)
    ok, verdict = keep_pruned(config, state, fold.run.labels[fold.val_idx], metrics, probs, calls)
    if chosen is None:
        ok, verdict = False, f"val accuracy {metrics['accuracy']:.3f} below the start's {state.origin_accuracy:.3f}; {verdict}"
    log.info("fold %d: prune level %.0f%% (%s): %s: %s", fold.index, 100 * level, mode, verdict, "kept" if ok else "stop")
    state.level_index = state.level_index + 1 if ok else n_levels
    state.level_applied = False
    if ok:
        state.prune_amount, state.kept = level, mode
        save_best(fold, state, model, _summary_metrics(metrics, model, level, state.kl_step), mode=mode)
    row = {"phase": "prune", "epoch": 0, "prune_level": level, "val_loss": metrics["nll"], "val_acc": metrics["accuracy"],
           "val_macro_f1": metrics["macro_f1"], "val_ece": metrics["ece"], "accepted": ok}
    end_step(fold, training, state, row, started)


# --------------------------------------------------------------------------------------------------------------
# A fold, phase by phase
# --------------------------------------------------------------------------------------------------------------


def fit_fold(fold: Fold) -> dict:
    """Train, prune and finish one fold, phase by phase from wherever it stands; returns its final metrics."""
    started = time.time()
    state, training = start_fold(fold)
    for phase in PHASES[PHASES.index(state.phase) : -1]:
        state.phase = phase
        training = PHASE_STEPS[phase](fold, state, training, started)
    return state.result["final"]


def train_phase(fold: Fold, state: FoldState, training: Training, started: float) -> Training:
    """--epoch epochs (a Bayesian head's first --pre_warm_epochs with its posterior means only), validated every
    --valid_every; the best model is saved, and --patience validations without a better one stop early."""
    config = fold.run.config
    phase_started, first_epoch = time.time(), state.epoch  # this session's pace estimates the time left
    while state.epoch < config.epoch:
        epoch = state.epoch
        deterministic = fold.bayes and epoch < config.pre_warm_epochs
        row = {"phase": "prewarm" if deterministic else "train", "epoch": epoch + 1, "prune_level": state.prune_amount}
        row.update(train_epoch(fold, training, state, epoch, deterministic))
        stop = False
        if (epoch + 1) % config.valid_every == 0 or epoch + 1 == config.epoch:
            stop = validate_and_keep_best(fold, training.model, state, row)
            log.info("fold %d epoch %d/%d: train loss %.4f acc %.3f | val acc %.3f macro-F1 %.3f ECE %.3f | fold: %s",
                     fold.index, epoch + 1, config.epoch, row["train_loss"], row["train_acc"], row["val_acc"],
                     row["val_macro_f1"], row["val_ece"],
                     time_left(time.time() - phase_started, epoch + 1 - first_epoch, config.epoch - first_epoch))
        state.epoch += 1
        if stop:
            log.info("fold %d: early stop, no better %s for %d validations", fold.index, config.select_metric, config.patience)
            state.epoch = config.epoch
        end_step(fold, training, state, row, started)
    return training


def prune_phase(fold: Fold, state: FoldState, training: Training, started: float) -> Training:
    """Stage B with --prune_target: from the best model, prune level by level, fine-tune each, and keep it while
    --prune_rule finds it predicting like the unpruned model."""
    config = fold.run.config
    if not (fold.bayes and config.prune_target > 0):
        return training
    levels = prune_levels(fold.source.prune_amount, config.prune_target, config.prune_step)  # the same on a resume
    if state.reference_f1 is None:
        training = load_best(fold, state, training, to_train=True)
        set_reference(fold, state, training.model)
    # Without fine-tuning nothing trains between levels: the refit cells' gene features stay those computed here
    # (prune_to recomputes them only once a level has removed fc1 inputs), saving an encoder pass per level.
    refit = refit_cells(fold, training.model) if config.prune_ft_epochs == 0 else None
    phase_started, first_level = time.time(), state.level_index
    while state.level_index < len(levels):
        level = levels[state.level_index]
        if not state.level_applied:
            training = prune_to(fold, state, training.model, level, refit)
        while state.epoch < config.prune_ft_epochs:
            row = {"phase": "prune_ft", "epoch": state.epoch + 1, "prune_level": level}
            row.update(train_epoch(fold, training, state, state.epoch, deterministic=False))
            state.epoch += 1
            end_step(fold, training, state, row, started)
        judge_level(fold, state, training, level, len(levels), started)
        if state.level_index < len(levels):
            log.info("fold %d: pruning level %d/%d next, %s at most", fold.index, state.level_index + 1, len(levels),
                     time_left(time.time() - phase_started, state.level_index - first_level, len(levels) - first_level))
    return training


def final_phase(fold: Fold, state: FoldState, training: Training, started: float) -> Training:
    """The kept model, calibrated (--temperature_scaling) and evaluated, written once more as `best` with the
    novelty statistics of exactly this model's features (after any physical pruning); the fold is then done.
    --epoch 0 without pruning makes the --model_path model the best."""
    training = load_best(fold, state, training)
    model = training.model
    if fold.run.config.temperature_scaling:
        calibrate(fold, model)
    metrics, prob_samples = evaluate(fold, model)
    novelty = fold_novelty(fold, model, prob_samples.mean(0)) if fold.run.ctx.main else None
    summary = _summary_metrics(metrics, model, state.prune_amount, state.kl_step) | {"kept": state.kept}
    save_best(fold, state, model, summary, novelty=novelty)
    log_kept(fold, state, metrics)
    log_report(fold, metrics)
    if fold.run.ctx.main:
        write_val_predictions(fold, prob_samples.mean(0))
    state.phase = "done"
    state.result["final"] = summary
    save_last(fold, state, training)
    barrier(fold.run.ctx)
    return training


PHASE_STEPS = {"train": train_phase, "prune": prune_phase, "final": final_phase}


def start_fold(fold: Fold) -> tuple[FoldState, Training | None]:
    """A fresh start (seeded per fold, the validation cells listed), or with --resume the fold's `last` checkpoint."""
    run, config = fold.run, fold.run.config
    last = run.files.fold(fold.index, "last.pth")
    if config.resume and last.exists():
        return restore(fold, last)
    state = FoldState(prune_amount=fold.source.prune_amount, kl_step=fold.source.kl_step)
    set_seed(config.seed + fold.index)
    model = build_model(config, fold.source, run.data.genes, len(run.classes))
    training = attach(fold, state, model, config.epoch * steps_per_epoch(fold))
    if fold.source.continues_model:
        set_origin(fold, state, model)
    if run.ctx.main:
        with atomic_write(run.files.fold(fold.index, "val_cells.txt")) as handle:
            handle.write("".join(f"{run.data.cell_ids[i]}\n" for i in fold.val_idx))
    return state, training


def restore(fold: Fold, path: Path) -> tuple[FoldState, Training | None]:
    """The state, model, optimizer, schedule, gradient scaler and random generators of a `last` checkpoint."""
    checkpoint = load_checkpoint(path)
    saved = checkpoint.training_state
    state = FoldState(**saved["fold_state"])
    log.info("fold %d: resumed from %s (phase %s, epoch %d)", fold.index, path, state.phase, state.epoch)
    if state.phase == "done":
        return state, None  # a finished fold: its result is in the state
    training = attach(fold, state, checkpoint.model, state.total_steps)
    training.optimizer.load_state_dict(saved["optimizer"])
    training.scheduler.load_state_dict(saved["scheduler"])
    training.scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"])
    return state, training


def load_best(fold: Fold, state: FoldState, training: Training, *, to_train: bool = False) -> Training:
    """Continue from the best checkpoint so far (once rank 0 has written it); without one, from the current model.
    to_train: sampled again whatever mode the checkpoint predicts in, as training and the paired rule need."""
    barrier(fold.run.ctx)
    best = fold.run.files.fold(fold.index, "best.pth")
    if best.exists():
        model = load_checkpoint(best).model
        if to_train:
            set_head(model, posterior_means=False)
        return attach(fold, state, model, 1)
    return training


def barrier(ctx: Dist) -> None:
    if ctx.distributed:
        dist.barrier()


# --------------------------------------------------------------------------------------------------------------
# A fold's outputs: checkpoints, metrics CSV, validation predictions, log
# --------------------------------------------------------------------------------------------------------------


def end_step(fold: Fold, training: Training, state: FoldState, row: dict, started: float) -> None:
    """After an epoch or a pruning verdict: its metrics row, the `last` checkpoint, every process in step."""
    record(fold, training, state, row, started)
    save_last(fold, state, training)
    barrier(fold.run.ctx)


def record(fold: Fold, training: Training, state: FoldState, row: dict, started: float) -> None:
    device = fold.run.device
    stats = training.model.pruning_stats()
    row.update(
        fold=fold.index, lr=training.optimizer.param_groups[0]["lr"],
        kl_scale=kl_scale(fold.run.config, state.kl_step, len(fold.train_set)),
        total_params=stats["total_params"], nonzero_params=stats["nonzero_params"], head_sparsity=stats["fc12_sparsity"],
        peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan"),
        seconds=time.time() - started,
    )
    state.history.append(row)
    if fold.run.ctx.main:
        write_metrics_csv(fold.run.files.fold(fold.index, "metrics.csv"), state.history)


def save_best(fold: Fold, state: FoldState, model: BayesianSparseTransformer, metrics: dict, *, mode: str | None = None,
              novelty: dict | None = None) -> None:
    """The best model so far, predicting in `mode` (a Bayesian head: "sampled" or "means"; None: as it is), with
    the origin's validation probabilities that a later Stage B round holds its decisions to."""
    if not fold.run.ctx.main:
        return
    predicts_with_means = model.config.head.posterior_means
    if mode is not None:
        set_head(model, posterior_means=mode == "means")
    _save(fold, "best", model, metrics, novelty=novelty, origin=state.origin_probs)
    set_head(model, posterior_means=predicts_with_means)


def save_last(fold: Fold, state: FoldState, training: Training) -> None:
    """The model with everything --resume needs to continue exactly here."""
    if fold.run.ctx.main:
        training_state = {"fold_state": vars(state), "optimizer": training.optimizer.state_dict(),
                          "scheduler": training.scheduler.state_dict(), "scaler": training.scaler.state_dict(),
                          "rng": _rng_state()}
        _save(fold, "last", training.model, {}, training_state=training_state)


def _save(fold: Fold, kind: str, model: BayesianSparseTransformer, metrics: dict, **extra) -> None:
    run = fold.run
    save_checkpoint(
        run.files.fold(fold.index, f"{kind}.pth"), model, genes=run.data.genes, classes=run.classes,
        bin_num=run.binning.bin_num, bin_width=run.binning.bin_width, bin_edges=run.binning.edges, stage="B" if model.is_bayesian else "A",
        args=run.config.as_dict(), metrics=metrics,
        class_counts=np.bincount(run.labels[fold.train_set.indices], minlength=len(run.classes)), **extra,
    )


def write_val_predictions(fold: Fold, probs: np.ndarray) -> None:
    """Mean MC probabilities of the kept model for every validation cell, with true and predicted labels."""
    run = fold.run
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell_id", "true_label", "pred_label", *run.classes])
    for index, row in zip(fold.val_idx, probs):
        writer.writerow([run.data.cell_ids[index], run.classes[run.labels[index]], run.classes[row.argmax()],
                         *(f"{p:.6g}" for p in row)])
    with atomic_write(run.files.fold(fold.index, "val_predictions.csv")) as handle:
        handle.write(buffer.getvalue())


def sharpening_only(fitted: float) -> float:
    """The ensemble temperature applied for a fitted one (see `fit_ensemble_temperature`)."""
    return min(fitted, 1.0)


def fit_ensemble_temperature(files: RunFiles, folds: int, classes: list[str]) -> dict:
    """The temperature for the pooled ensemble: fitted to the out-of-fold validation predictions (every training
    cell once, predicted by a fold model that never trained on it, so no cell judges a model it taught), and
    applied only where it sharpens (T < 1).

    The fit calibrates one member; prediction pools members geometrically, which makes the pool less confident
    than its members wherever they disagree, while it is more accurate. So an under-confident member (T < 1)
    means an at least as under-confident pool, and sharpening by T is a partial, safe correction; an
    over-confident member (T > 1) says little about the pool, which its pooling has already softened: on inner
    splits of the bundled data (benchmarks/calibration_inner.py) softening it left the pool under-confident.
    """
    table = pd.concat([pd.read_csv(files.fold(k, "val_predictions.csv")) for k in range(folds)])
    probs = table[classes].to_numpy(dtype=np.float64)
    labels = pd.Index(classes).get_indexer(table["true_label"].astype(str))
    fitted = fit_temperature(probs[None], labels)
    temperature = sharpening_only(fitted)
    before = classification_metrics(probs, labels, classes)
    after = classification_metrics(tempered(probs[None], fitted)[0], labels, classes)
    log.info("ensemble temperature %.3f (fitted %.3f to the out-of-fold predictions of %d cells: NLL %.3f -> %.3f, "
             "ECE %.3f -> %.3f; applied only below 1)", temperature, fitted, len(labels), before["nll"], after["nll"],
             before["ece"], after["ece"])
    return {"temperature": temperature, "fitted": fitted, "cells": len(labels),
            "fitted_to": "out-of-fold validation predictions", "nll": [before["nll"], after["nll"]],
            "ece": [before["ece"], after["ece"]]}


def log_kept(fold: Fold, state: FoldState, metrics: dict) -> None:
    """Say what a continued model's run kept: Stage B's head (sampled, or its posterior means) or the start model."""
    if state.origin_probs is None:
        return
    origin = classification_metrics(np.asarray(state.origin_probs), fold.run.labels[fold.val_idx], fold.run.classes)
    if state.kept == "start":
        log.info("fold %d: kept the model it continued: training did not improve its validation %s (NLL %.3f)",
                 fold.index, fold.run.config.select_metric, metrics["nll"])
    else:
        what = "sampled Bayesian head" if state.kept == "sampled" else "Bayesian head's posterior means (they beat its samples)"
        log.info("fold %d: kept the %s: validation NLL %.3f, accuracy %.3f (the model the runs started from: NLL %.3f, "
                 "accuracy %.3f)", fold.index, what, metrics["nll"], metrics["accuracy"], origin["nll"], origin["accuracy"])


def log_report(fold: Fold, metrics: dict) -> None:
    classes = fold.run.classes
    log.info("fold %d best model: accuracy %.4f, macro-F1 %.4f, ECE %.4f, NLL %.4f", fold.index,
             metrics["accuracy"], metrics["macro_f1"], metrics["ece"], metrics["nll"])
    matrix = np.array(metrics["confusion_matrix"])
    width = max(len(c) for c in classes)
    lines = ["confusion matrix (rows: true, columns: predicted, in class order):"]
    lines += [f"  {name:>{width}} " + " ".join(f"{v:4d}" for v in row) for name, row in zip(classes, matrix)]
    log.info("\n".join(lines))
    y_true = np.repeat(np.arange(len(classes)), matrix.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in matrix])
    log.info("classification report:\n%s", classification_report(
        y_true, y_pred, labels=np.arange(len(classes)), target_names=classes, zero_division=0, digits=4))


def _summary_metrics(metrics: dict, model: BayesianSparseTransformer, prune_amount: float, kl_step: int) -> dict:
    stats = model.pruning_stats()
    return {
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"], "nll": metrics["nll"],
        "brier": metrics["brier"], "prune_amount": prune_amount, "kl_step": kl_step,
        "temperature": model.config.head.temperature, "head_sparsity": stats["fc12_sparsity"],
        "total_params": stats["total_params"], "nonzero_params": stats["nonzero_params"],
    }


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # Only this process's GPU: every rank starts from the same seed, so rank 0's state stands for all of them.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and isinstance(state["cuda"], torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    random.setstate((state["python_version"], tuple(state["python"]), None))


METRIC_COLUMNS = [
    "fold", "phase", "epoch", "prune_level", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
    "val_ece", "lr", "kl", "kl_scale", "total_params", "nonzero_params", "head_sparsity", "accepted", "peak_mem_mb",
    "seconds",
]


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def run(config: TrainConfig, adata: anndata.AnnData | None = None) -> dict:
    """One training run (every fold) on `adata`, or on --data_path; returns the summary (per fold and mean ± std).

    The run directory is locked for the whole run (one writer at a time); its manifest, written last, makes it a
    complete run that prediction and the next stage accept.
    """
    ctx, device = init_distributed(config.device)
    target = Path(config.ckpt_dir)
    check_directory_path(target)
    with locked(target, "run directory") if ctx.main else contextlib.nullcontext():
        # --overwrite of a complete run trains beside it and swaps the new run in at the end, so a kill at any
        # moment leaves the complete old run. An interrupted overwrite's partial run is never resumed: cleared here.
        staging = target.parent / f"{STAGING_PREFIX}{target.name}-overwrite"
        if ctx.main:
            shutil.rmtree(staging, ignore_errors=True)
        replace_whole = config.overwrite and (target / MANIFEST).exists()
        if replace_whole:
            check_one_run(target, config.model_name)
        summary = _run_locked(config, adata, ctx, device, RunFiles(staging if replace_whole else target, config.model_name))
        if replace_whole and ctx.main:
            swap_in(staging, target)
        return summary


def _run_locked(config: TrainConfig, adata: anndata.AnnData | None, ctx: Dist, device: torch.device,
                files: RunFiles) -> dict:
    # Every input is read and checked before the first output is written: a bad input leaves nothing behind.
    sources = read_sources(config)
    source = sources[0]  # every member of an ensemble has the same genes, classes and binning
    config = adopt_checkpoint_binning(config, source)
    existing = check_outputs(config, files)
    data, labels, classes = read_data(config, sources, adata)
    fingerprint = data_fingerprint(data.matrix, data.cell_ids, data.genes, labels)
    check_resumed_data(config, files, fingerprint)
    splits = stratified_splits(labels, config.cv_splits, test_size=0.2, seed=config.seed, class_names=classes)
    if source.checkpoint is None and config.pos_embed and config.gene2vec_path:
        source.gene_vectors = load_gene_vectors(config.gene2vec_path, data.genes, config.dim)
    if config.model_path and source.checkpoint is None:
        build_model(config, source, data.genes, len(classes))  # a foreign encoder must fit before anything is written
    create_outputs(config, files, ctx, existing, fingerprint)
    setup_logging(files, ctx, config.verbose)
    try:
        log.info("data: %d cells, %d genes, %d classes; %d fold(s); device %s x %d", len(labels), len(data.genes),
                 len(classes), len(splits), device, ctx.world)
        if isinstance(data.matrix, BackedMatrix):
            log.info("data: %s", data.matrix.describe())
            # the reader's many small HDF5 allocations pin the heap between the batches' activations, which then
            # fragment it: a tiny model's backed epoch over 10^5 cells peaked at 3.5 GB (see allocator)
            allocator.map_large_blocks()
        setup = RunSetup(config, ctx, device, files, data, labels, classes, run_binning(config, source, data.matrix))
        results = [fit_fold(make_fold(setup, index, train_idx, val_idx, sources[index] if len(sources) > 1 else source))
                   for index, (train_idx, val_idx) in enumerate(splits)]
        summary = summarise(results)
        if ctx.main:
            write_json(files.summary, summary)
            members = [{"fold": k, "checkpoint": files.fold(k, "best.pth").name,
                        "val_cells": files.fold(k, "val_cells.txt").name,
                        "val_predictions": files.fold(k, "val_predictions.csv").name} for k in range(len(splits))]
            # The architecture as the models have it: a continued checkpoint fixes it, whatever the options' defaults say.
            model_config = read_checkpoint_file(files.fold(0, "best.pth"))["model_config"]
            calibration = fit_ensemble_temperature(files, len(splits), classes) if config.ensemble_temperature else None
            write_manifest(files.directory, name=config.model_name, stage=run_stage(config), options=config.as_dict(),
                           members=members, fingerprint=fingerprint, classes=classes, genes=len(data.genes),
                           model_config=model_config, calibration=calibration)
            log.info("summary over %d fold(s): accuracy %.4f ± %.4f, macro-F1 %.4f ± %.4f, ECE %.4f ± %.4f", len(results),
                     summary["accuracy"]["mean"], summary["accuracy"]["std"], summary["macro_f1"]["mean"],
                     summary["macro_f1"]["std"], summary["ece"]["mean"], summary["ece"]["std"])
    finally:
        close_logging()
    if ctx.distributed:
        dist.destroy_process_group()
    return summary


def run_stage(config: TrainConfig) -> str:
    """The stage a finished run is, as its manifest records it: A deterministic, B1 Bayesian, B2 Bayesian and pruned."""
    if not config.bayes_head:
        return "A"
    return "B2" if config.prune_target > 0 else "B1"


def model_kind(path: str | os.PathLike) -> str:
    """What --model_path holds: 'bayesian' or 'deterministic' (one of our models, a run directory or a checkpoint
    file), or 'none' (a foreign encoder such as scBERT's pretrained weights)."""
    path = Path(path)
    if path.is_dir():
        return "bayesian" if read_run(path, purpose="continue it").options.get("bayes_head") else "deterministic"
    payload = read_checkpoint_file(path)
    if payload.get("format") != CHECKPOINT_FORMAT:
        return "none"
    return "bayesian" if payload.get("stage") == "B" else "deterministic"  # save_checkpoint's stage: B = Bayesian head


def read_data(config: TrainConfig, sources: list[Source], adata: anndata.AnnData | None) -> tuple[ExpressionData, np.ndarray, list[str]]:
    """The labelled cells (of `adata`, else --data_path), genes aligned to a checkpoint's; their class indices and
    the class names. Data with cell types the checkpoint lacks gets a new head (Stage A only)."""
    source = sources[0]
    options = dict(label_key=config.label_key, layer=config.layer, use_raw=config.use_raw, normalize=config.normalize,
                   min_cells_per_class=config.min_cells_per_class, gene_symbols=config.gene_symbols,
                   any_scale=config.binning == "quantile")
    path = config.data_path if adata is None else adata.filename  # a backed AnnData's file can be read backed too
    backed, reason = backed_decision(path, config.backed)
    if backed:
        data = load_backed_dataset(path, **options)
        data = replace(data, matrix=replace(data.matrix, reason=reason))
    elif adata is not None:
        data = dataset_from_anndata(adata, **options)
    else:
        data = load_dataset(config.data_path, **options)
    check_training_labels(data, config.min_cells_per_class)
    if source.genes is not None:
        data = align_columns(data, source.genes)
    elif config.gene_num is not None and config.gene_num != len(data.genes):
        raise UserError(f"--gene_num {config.gene_num} does not match the data's {len(data.genes)} genes; "
                        "drop --gene_num or subset the data")
    if source.checkpoint is not None:
        unseen = sorted(set(data.labels) - set(source.checkpoint.classes))
        if unseen and config.bayes_head:
            raise UserError(f"{len(unseen)} cell types of the data are not among the checkpoint's classes "
                            f"({', '.join(map(repr, unseen[:3]))}); Stage B continues a Stage A model on the same "
                            "types: train Stage A on this data first (--model_path without --bayes_head)")
        for member in sources:
            member.new_head = bool(unseen)
    check_fixed_options(config, source)
    labels, classes = encode_labels(data.labels, source.classes)
    return data, labels, classes


def summarise(results: list[dict]) -> dict:
    """The folds' final metrics, and the mean and standard deviation of the main ones over folds."""
    summary = {"folds": results}
    for key in ("accuracy", "macro_f1", "ece", "nll", "head_sparsity", "total_params"):
        values = np.array([r[key] for r in results], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std())}
    return summary


def fit(adata: anndata.AnnData, ckpt_dir: str | os.PathLike, **given) -> dict:
    """Train from an in-memory AnnData, as `finetune_sparse.py` does from a file: the same options by name (checked
    the same way), the same outputs in `ckpt_dir`; returns the run summary. Quiet unless `verbose=True` (the log
    file in `ckpt_dir` has every line). E.g. Stage A then Stage B over 5 cross-fitted folds:

        fit(adata, "runs/a", label_key="cell_type", preset="demo")
        fit(adata, "runs/b", label_key="cell_type", preset="demo", model_path="runs/a")   # stage B1 of the preset
    """
    file_only = sorted({"data_path", "ckpt_dir"} & set(given))
    if file_only:
        raise TypeError(f"fit() takes the data and the run directory as arguments, not {file_only}")
    return run(default_config(ckpt_dir=str(ckpt_dir), **{"verbose": False, **given}), adata)


# --------------------------------------------------------------------------------------------------------------
# The pipeline: Stage A -> Stage B round 1 -> round 2 (-> prediction), resumable stage by stage
# --------------------------------------------------------------------------------------------------------------


PIPELINE_STAGES = {"A": "stageA", "B1": "stageB1", "B2": "stageB2"}
# Environment variables of the shell pipeline (train_sparse.sh), each an option of the stages it acted on in the
# original shell scripts: architecture and binning in Stage A (later stages continue its model), the Bayesian and
# pruning settings in the rounds that use them, and the rest in every stage.
ALL_STAGES = ("A", "B1", "B2")


def _env(stages: tuple[str, ...], *names: str) -> dict[str, tuple[tuple[str, ...], str]]:
    return {name: (stages, name.lower()) for name in names}


# variable -> (the stages it sets, the option it sets)
ENV_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    **_env(("A",), "DIM", "DEPTH", "HEADS", "DIM_HEAD", "H_DIM", "BIN_NUM", "BIN_WIDTH", "DROPOUT", "LEARNING_RATE"),
    **_env(("B1",), "INIT_LOG_SIGMA", "PRIOR_SIGMA", "PRE_WARM_EPOCHS"),
    **_env(("B1", "B2"), "KL_WEIGHT", "KL_ANNEAL_STEPS", "GROUP_LASSO", "PRUNE_DIM", "PRUNE_LAYERS"),
    **_env(("B2",), "PRUNE_TARGET", "PRUNE_STEP", "PRUNE_FT_EPOCHS", "PRUNE_F1_TOL", "PRUNE_MODE", "PRUNE_RULE",
           "PRUNE_NLL_TOL", "PRUNE_MAX_CHANGED", "PRUNE_SCORE", "PRUNE_DISTILL", "PRUNE_REFIT"),
    **_env(ALL_STAGES, "BATCH_SIZE", "GRAD_ACC", "PATIENCE", "SEED", "DEVICE", "CV_SPLITS", "SELECT_METRIC",
           "CLASS_WEIGHT", "TEMPERATURE_SCALING", "LABEL_KEY"),
    "EPOCHS_A": (("A",), "epoch"), "EPOCHS_B": (("B1",), "epoch"), "LEARNING_RATE_B": (("B1", "B2"), "learning_rate"),
    "MC_SAMPLES": (ALL_STAGES, "mc_samples_eval"),
}
# ... and these set prediction's options
PREDICT_ENV = {"MC_SAMPLES": "bayes_mc_samples", "DEVICE": "device", "PREDICT_LABEL_KEY": "label_key"}


def stage_options_from_env(environ: dict[str, str]) -> dict[str, dict]:
    """The shell pipeline's environment variables as options per stage ({'A': {...}, 'B1': ..., 'predict': ...})."""
    per_stage: dict[str, dict] = {stage: {} for stage in (*PIPELINE_STAGES, "predict")}
    given = {name: value for name, value in environ.items() if value != ""}
    for name, (stages, option) in ENV_OPTIONS.items():
        if name in given:
            for stage in stages:
                per_stage[stage][option] = given[name]
    per_stage["predict"] = {option: given[name] for name, option in PREDICT_ENV.items() if name in given}
    return per_stage


def stage_state(directory: Path) -> str:
    """'complete' (its manifest is there), 'started' (an interrupted run to --resume) or 'new'."""
    if (directory / MANIFEST).exists():
        return "complete"
    return "started" if config_files(directory) else "new"


def pipeline(data: anndata.AnnData | str | os.PathLike | None, run_dir: str | os.PathLike, preset: str | None = "demo", *,
             stages: tuple[str, ...] = ("A", "B1", "B2"), start: str | os.PathLike | None = None,
             predict: str | os.PathLike | None = None,
             stage_options: dict[str, dict] | None = None, overwrite: bool = False, **overrides) -> dict:
    """The method end to end: Stage A (deterministic) -> Stage B round 1 (Bayesian head) -> round 2 (pruning), each
    over the preset's cross-fitted folds in `run_dir/stageA`, `stageB1`, `stageB2`; then, with `predict` (an .h5ad),
    the final model annotates those cells into `run_dir/predictions`.

    `data` is an AnnData, an .h5ad path, or None for the bundled PBMC cells. `start` is the model the first of
    `stages` continues (a run directory or checkpoint; default: the previous stage's directory in `run_dir`). `overrides` are options of every training
    stage (e.g. `label_key="cell_type"`, `seed=1`); `stage_options={"B2": {...}, "predict": {...}}` one stage's. Run
    again, it continues where it stopped: complete stages are kept, an interrupted one resumes fold by fold
    (`overwrite=True` starts over). Returns {stage: its summary, "final_model": path, "predictions": summary or None}.
    """
    import predict_updated  # imported here: prediction imports this module's neighbours, not the other way round

    run_dir = Path(run_dir)
    stage_options = {key: dict(value) for key, value in (stage_options or {}).items()}
    unknown = sorted(set(stages) - set(PIPELINE_STAGES))
    if unknown or not stages:
        raise UserError(f"stages must be some of {', '.join(PIPELINE_STAGES)}, got {', '.join(stages) or 'none'}")
    adata = data if isinstance(data, anndata.AnnData) else None
    data_path = None if data is None or adata is not None else os.fspath(data)
    predict_config = None
    if predict is not None:  # checked before hours of training: a wrong file fails now
        predict_given = {"data_path": os.fspath(predict), "output_dir": str(run_dir / "predictions"), "overwrite": True,
                         "preset": preset, **stage_options.get("predict", {})}
        predict_config = predict_updated.default_config(run_dir / PIPELINE_STAGES[stages[-1]], **predict_given)
        predict_updated.check_input(predict_config)
    results: dict = {}
    previous = Path(start) if start is not None else None
    for stage in PIPELINE_STAGES:
        directory = run_dir / PIPELINE_STAGES[stage]
        if stage not in stages:
            if start is None and stage_state(directory) == "complete":
                previous = directory
            continue
        state = "new" if overwrite else stage_state(directory)
        given = {"preset": preset, "stage": stage, "ckpt_dir": str(directory), "model_name": PIPELINE_STAGES[stage],
                 "data_path": data_path, **overrides, **stage_options.get(stage, {})}
        if previous is not None:
            if not previous.exists():
                raise UserError(f"stage {stage} would continue {previous}, which does not exist; pass a run directory "
                                "or checkpoint to --start (START_CKPT)")
            given["model_path"] = str(previous)
        elif stage != "A":
            raise UserError(f"stage {stage} continues a model, but {run_dir / PIPELINE_STAGES['A' if stage == 'B1' else 'B1']} "
                            "holds no complete run; run the earlier stage first, or pass --start (START_CKPT)")
        if state == "complete":
            log.info("%s: complete in %s, kept", stage, directory)
            results[stage] = read_json(directory / f"{PIPELINE_STAGES[stage]}_summary.json")
        else:
            given |= {"resume": True} if state == "started" else {"overwrite": overwrite}
            results[stage] = run(default_config(**given), adata)
        previous = directory
    results["final_model"] = str(previous)
    main_process = int(os.environ.get("RANK", "0")) == 0
    results["predictions"] = predict_updated.run(predict_config) if predict_config is not None and main_process else None
    return results


def pipeline_summary(run_dir: str | os.PathLike) -> str:
    """A table of every complete stage's out-of-fold validation (each cell predicted by the fold model that never
    trained on it): cells, accuracy, macro-F1, NLL, ECE, parameters, head sparsity, checkpoint size, the ensemble's
    temperature and what each fold kept (Stage B: the model it continued, or its head sampled / posterior means)."""
    from sklearn.metrics import accuracy_score, f1_score

    lines = [f"{'stage':<10}{'cells':>7}{'accuracy':>10}{'macro-F1':>10}{'NLL':>8}{'ECE':>8}{'params':>10}"
             f"{'head sparsity':>15}{'ckpt MB':>9}{'temp.':>7}  kept"]
    for name in PIPELINE_STAGES.values():
        directory = Path(run_dir) / name
        if stage_state(directory) != "complete":
            continue
        run_info = read_run(directory)
        summary = read_json(directory / f"{name}_summary.json")
        true, pred = [], []
        for member in run_info.manifest["members"]:
            with open(directory / member["val_predictions"], encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    true.append(row["true_label"])
                    pred.append(row["pred_label"])
        megabytes = sum(path.stat().st_size for path in run_info.members) / 2**20
        lines.append(f"{name:<10}{len(true):>7}{accuracy_score(true, pred):>10.4f}"
                     f"{f1_score(true, pred, average='macro'):>10.4f}{summary['nll']['mean']:>8.4f}"
                     f"{summary['ece']['mean']:>8.4f}{int(summary['total_params']['mean']):>10d}"
                     f"{summary['head_sparsity']['mean']:>15.1%}{megabytes:>9.2f}"
                     f"{ensemble_temperature(directory):>7.2f}  {kept_counts(summary['folds'])}")
    return "\n".join(lines)


def kept_counts(folds: list[dict]) -> str:
    """'3 sampled, 2 start': how many folds kept what (see FoldState.kept)."""
    kept = [fold.get("kept", "trained") for fold in folds]
    return ", ".join(f"{kept.count(k)} {k}" for k in sorted(set(kept)))


def pipeline_main(argv: list[str]) -> int:
    """`finetune_sparse.py pipeline`: the shell pipeline's entry point (train_sparse.sh and the stage scripts)."""
    parser = argparse.ArgumentParser(prog="finetune_sparse.py pipeline", description=pipeline.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=os.environ.get("PRESET", "full"), help="demo or full (env PRESET)")
    parser.add_argument("--run_dir", default=os.environ.get("RUN_DIR"), help="the run's directory (env RUN_DIR; "
                        "default runs/PRESET)")
    parser.add_argument("--data_path", default=os.environ.get("DATA_PATH") or None, help="training .h5ad (env DATA_PATH; "
                        "default: the bundled PBMC cells)")
    parser.add_argument("--stages", default="A,B1,B2", help="which stages to run, in order (earlier complete ones are "
                        "kept and continued from)")
    parser.add_argument("--start", default=os.environ.get("START_CKPT") or None, help="the model the first stage "
                        "continues (env START_CKPT; default: the previous stage in RUN_DIR)")
    parser.add_argument("--predict_path", default=os.environ.get("PREDICT_PATH") or None, help="annotate these cells with "
                        "the final model (env PREDICT_PATH; PREDICT_LABEL_KEY evaluates on them)")
    parser.add_argument("--overwrite", action="store_true", help="start every stage over")
    parser.add_argument("--resume", action="store_true", help="accepted for the shell scripts' old spelling; the "
                        "pipeline always continues an interrupted stage")
    parser.add_argument("--print_preset", action="store_true", help="print the preset's values per stage and exit")
    args, extra = parser.parse_known_args(argv)

    def job() -> None:
        if args.print_preset:
            print(options.describe_preset(args.preset))
            return
        per_stage = stage_options_from_env(dict(os.environ))
        extra_given = options.parse_given(TrainConfig, extra, "") if extra else {}
        for stage in PIPELINE_STAGES:
            per_stage[stage] |= extra_given
        run_dir = args.run_dir or f"runs/{args.preset}"
        stages = tuple(name.strip() for name in args.stages.split(",") if name.strip())
        results = pipeline(args.data_path, run_dir, args.preset, stages=stages, start=args.start, predict=args.predict_path,
                           stage_options=per_stage, overwrite=args.overwrite, verbose=True)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        print("== Summary: out-of-fold validation (each cell predicted by the fold model that never trained on it) ==")
        print(pipeline_summary(run_dir))
        print(f"final model: {results['final_model']}")
        print(f"predict new cells with: python predict_updated.py --model_path '{results['final_model']}' "
              "--data_path NEW.h5ad --bayes_mc_samples 8")

    return run_cli(job, interrupted="interrupted; rerun the same command to continue where it stopped")


def main(argv: list[str] | None = None, description: str = __doc__, **defaults) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pipeline"]:
        return pipeline_main(argv[1:])
    return run_cli(lambda: run(options.cli_config(TrainConfig, argv, description, defaults=defaults, stage_of=stage_of)),
                   interrupted="interrupted; rerun the same command with --resume to continue where it stopped")


if __name__ == "__main__":
    sys.exit(main())
