"""The checkpoint format and its IO: a self-describing file that rebuilds the model alone, and scBERT's encoder.

A checkpoint holds the model's config and weights with everything prediction needs beside them: the gene list,
the class names, the binning, the stage, the training options and metrics, the package versions and, for a
finished model, its novelty statistics (see `novelty.py`). Files are read with torch.load(weights_only=True).
Also here: the gene2vec reader, which fills the gene embedding of a new model.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bayesian_sparse_transformer import BayesianSparseTransformer, ModelConfig
from binning import Binning
from novelty import missing_statistics
from performer_pytorch import convert_scbert_state_dict, is_scbert_state_dict
from run_manifest import read_run
from utils import UserError, atomic_write, package_versions

CHECKPOINT_FORMAT = "bayesian-sparse-transformer/1"


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded, self-describing checkpoint: the model rebuilt from the file alone, plus its metadata."""

    model: BayesianSparseTransformer
    genes: list[str]
    classes: list[str]
    bin_num: int
    stage: str
    args: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    training_state: dict | None = None
    versions: dict = field(default_factory=dict)
    bin_width: float = 1.0  # scBERT's binning
    bin_edges: tuple[float, ...] | None = None  # quantile bins' cut points (binning.quantile_binning)
    # Stage B: the validation probabilities (cells, classes) of the model the chain of training runs started from,
    # the bar every later round's decisions are held to (finetune_sparse.set_origin)
    origin: list | None = None
    # the novelty statistics (see novelty.missing_statistics for what they hold); None until a fold model is final
    novelty: dict | None = None
    # training cells per class (the calls' class shares, utils.call_weights); None in checkpoints written before
    class_counts: list[int] | None = None

    @property
    def binning(self) -> Binning:
        return Binning(self.bin_num, self.bin_width, self.bin_edges)


def save_checkpoint(
    path: str | Path,
    model: BayesianSparseTransformer,
    *,
    genes: list[str],
    classes: list[str],
    bin_num: int,
    stage: str,
    bin_width: float = 1.0,
    bin_edges: Sequence[float] | None = None,
    origin: list | None = None,
    args: dict | None = None,
    metrics: dict | None = None,
    training_state: dict | None = None,
    novelty: dict | None = None,
    class_counts: Sequence[int] | None = None,
) -> None:
    """Write everything needed to rebuild and use the model, atomically (a kill never leaves a torn file)."""
    module = model.module if hasattr(model, "module") else model  # unwrap DistributedDataParallel
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": module.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        # Plain str: numpy strings would make the file unloadable under weights_only=True.
        "genes": [str(gene) for gene in genes],
        "classes": [str(name) for name in classes],
        "bin_num": int(bin_num),
        "bin_width": float(bin_width),
        "bin_edges": None if bin_edges is None else [float(edge) for edge in bin_edges],
        "stage": stage,
        "args": dict(args or {}),
        "metrics": dict(metrics or {}),
        "versions": package_versions(),
        "training_state": training_state,
    }
    if novelty is not None:
        payload["novelty"] = novelty
    if origin is not None:
        payload["origin"] = origin
    if class_counts is not None:
        payload["class_counts"] = [int(count) for count in class_counts]
    # Serialize in memory first: torch.save's C++ writer turns a failed write (disk full) into an opaque
    # RuntimeError, while a plain write keeps the OSError that atomic_write reports with the path.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def read_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True (never runs code from the file); every failure is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path", {"model_path": None})
    with open(path, "rb") as handle:
        magic = handle.read(4)
    # torch.save writes a zip archive (PK..); old-style and plain pickles start with the protocol byte 0x80.
    if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):
        raise UserError(f"{path} is not a readable PyTorch checkpoint (another file type, or empty); check the path",
                        {"model_path": None})
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"refusing to load {path}: it contains Python objects other than tensors and plain data, which could run "
            "code; load only checkpoints you trust, re-saved as a plain state dict"
        ) from err
    except (RuntimeError, EOFError, IndexError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or another file type): {err}".splitlines()[0]) from err
    if not isinstance(payload, dict):
        raise UserError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
    return payload


def checkpoint_paths(path: str | Path, *, purpose: str = "predict with it") -> list[Path]:
    """The model files behind a model path: one checkpoint file, or the members a complete run directory's manifest
    lists (a cross-fitted ensemble: each fold model trained on all cells but its own validation fold).

    A directory that is not one complete run (unfinished, or holding several runs) is refused, never globbed.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    return read_run(path, purpose=purpose).members


def load_ensemble(path: str | Path, map_location: str | torch.device = "cpu", *, purpose: str = "predict with it") -> list[Checkpoint]:
    """The checkpoints behind `path` (see `checkpoint_paths`); they must share genes, classes and binning."""
    paths = checkpoint_paths(path, purpose=purpose)
    members = [load_checkpoint(p, map_location) for p in paths]
    first = members[0]
    for other, other_path in zip(members[1:], paths[1:]):
        if (other.genes, other.classes, other.binning) != (first.genes, first.classes, first.binning):
            raise UserError(f"{other_path} does not belong to the same ensemble as the other checkpoints in {path} "
                            "(other genes, cell types or binning); keep one run's checkpoints per directory")
    return members


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild a model saved by `save_checkpoint` from the file alone (no architecture flags)."""
    return checkpoint_from_payload(path, read_checkpoint_file(path, map_location), map_location)


def checkpoint_from_payload(path: str | Path, payload: dict, map_location: str | torch.device = "cpu") -> Checkpoint:
    """`load_checkpoint` for a file already read with `read_checkpoint_file` (`path` only names it in errors)."""
    if payload.get("format") != CHECKPOINT_FORMAT:
        hint = " (it looks like a scBERT checkpoint: use it as a pretrained encoder with finetune_sparse.py)" if (
            is_scbert_state_dict(_state_dict_of(payload))
        ) else ""
        raise UserError(f"{path} is not a checkpoint of this project{hint}")
    _check_current(path, payload)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = BayesianSparseTransformer(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is damaged or built for another architecture: {str(err).splitlines()[0]}") from err
    _check_metadata(path, payload, config)
    model.to(map_location)
    return Checkpoint(
        model=model,
        genes=list(payload["genes"]),
        classes=list(payload["classes"]),
        bin_num=int(payload["bin_num"]),
        stage=str(payload["stage"]),
        args=payload.get("args") or {},
        metrics=payload.get("metrics") or {},
        training_state=payload.get("training_state"),
        versions=payload.get("versions") or {},
        bin_width=float(payload["bin_width"]),
        bin_edges=None if payload.get("bin_edges") is None else tuple(payload["bin_edges"]),
        novelty=payload.get("novelty"),
        origin=payload.get("origin"),
        class_counts=payload.get("class_counts"),
    )


def _check_current(path: str | Path, payload: dict) -> None:
    """Refuse a checkpoint that an earlier version of this project wrote (no bin_width, or novelty statistics of an
    earlier form): this version reads only its own format, and retraining writes it."""
    lacking = [] if "bin_width" in payload else ["bin_width"]
    if payload.get("novelty") is not None:
        lacking += [f"novelty {key}" for key in missing_statistics(payload["novelty"])]
    if lacking:
        shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
        raise UserError(f"{path} was written by an earlier version of this project (it lacks {shown}); retrain the "
                        "model with this version (finetune_sparse.py) to use it", {"model_path": None})


def _check_metadata(path: str | Path, payload: dict, config: ModelConfig) -> None:
    """The gene list, class names and bin_num must fit the model they describe (a tampered file would not)."""
    genes, classes, bin_num = payload["genes"], payload["classes"], payload["bin_num"]
    problems = []
    if len(genes) + 1 != config.encoder.max_seq_len:
        problems.append(f"{len(genes)} genes for a model of {config.encoder.max_seq_len - 1}")
    if len(classes) != config.head.num_classes:
        problems.append(f"{len(classes)} class names for {config.head.num_classes} outputs")
    if not isinstance(bin_num, int) or not 1 <= bin_num <= config.encoder.num_tokens - 2:
        problems.append(f"bin_num {bin_num!r} for {config.encoder.num_tokens} tokens")
    edges = payload.get("bin_edges")
    if edges is not None and (len(edges) != bin_num - 1 or list(edges) != sorted(edges)):
        problems.append(f"{len(edges)} bin cut points for {bin_num} bins")
    if problems:
        raise UserError(f"{path} is inconsistent ({'; '.join(problems)}); it was altered or damaged, use the original file")


def _state_dict_of(payload: dict) -> dict:
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(payload.get(key), dict):
            return payload[key]
    return payload


def load_pretrained_encoder(model: BayesianSparseTransformer, path: str | Path, payload: dict | None = None) -> list[str]:
    """Initialise `model.encoder` (and the head, when it fits) from scBERT's checkpoint or one of ours.

    `payload` is the file's content when the caller has read it already (scBERT's encoder is large: read it once
    for all folds). Returns human-readable notes about what was loaded and what was skipped.
    """
    payload = read_checkpoint_file(path) if payload is None else payload
    source = _state_dict_of(payload)
    if payload.get("format") == CHECKPOINT_FORMAT:
        encoder_sd = {k[len("encoder."):]: v for k, v in source.items() if k.startswith("encoder.")}
        head_sd = {k[len("head."):]: v for k, v in source.items() if k.startswith("head.")}
    elif is_scbert_state_dict(source):
        try:
            encoder_sd, leftover = convert_scbert_state_dict(source)
        except KeyError as err:
            raise UserError(f"{path} is an incomplete scBERT checkpoint: {err.args[0]}") from err
        # A fine-tuned scBERT keeps its classifier under to_out.{conv1,fc1,fc2,fc3}; a pretrained one has only the
        # language-model output to_out.{weight,bias}, which has no use here.
        head_sd = {k[len("to_out."):]: v for k, v in leftover.items() if k.startswith("to_out.") and k.count(".") == 2}
    else:
        raise UserError(f"{path} is neither a checkpoint of this project nor a scBERT PerformerLM state dict")
    own = model.encoder.state_dict()
    for key, value in encoder_sd.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(
                f"{path} was built for another architecture: {key} has shape {tuple(value.shape)} there and "
                f"{tuple(own[key].shape)} here; match the width, depth, heads, head width, random features, bins "
                "and gene count to the checkpoint",
                {name: None for name in ("dim", "depth", "heads", "dim_head", "nb_features", "bin_num")},
            )
    unexpected = sorted(set(encoder_sd) - set(own))
    missing = sorted(k for k in set(own) - set(encoder_sd) if not k.endswith(("calls_since_redraw", "num_redraws")))
    if unexpected or missing:
        raise UserError(
            f"{path} does not match this encoder (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "match the depth, the local attention heads and the gene embedding to the checkpoint",
            {"depth": None, "local_attn_heads": None, "pos_embed": False},
        )
    model.encoder.load_state_dict(encoder_sd, strict=False)
    notes = [f"loaded {len(encoder_sd)} encoder tensors from {path}"]
    head_own = model.head.state_dict()
    fits = head_sd and all(k in head_own and head_own[k].shape == v.shape for k, v in head_sd.items())
    if fits:
        model.head.load_state_dict(head_sd, strict=False)
        notes.append(f"loaded the classifier head ({len(head_sd)} tensors)")
    elif head_sd:
        notes.append("the checkpoint's classifier head does not fit this data's genes/classes; the head starts fresh")
    return notes


# --------------------------------------------------------------------------------------------------------------
# Gene2vec vectors
# --------------------------------------------------------------------------------------------------------------


def load_gene_vectors(path: str | Path, genes: list[str], dim: int) -> Tensor:
    """Gene embedding table (genes+1, dim) from a `.npy` in gene order or a text file `SYMBOL v1 … vN`.

    Text vectors are aligned by symbol; genes without a vector get zeros (counted in a warning). The last row,
    for scBERT's appended token, is zero as in scBERT.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gene2vec file not found: {path}; give an existing file or none", {"gene2vec_path": None})
    if path.suffix == ".npy":
        try:
            vectors = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise UserError(f"cannot read {path} as a numpy array ({err}); save it with np.save") from err
        if vectors.ndim != 2 or vectors.shape[0] not in (len(genes), len(genes) + 1) or vectors.shape[1] != dim:
            raise UserError(
                f"{path} has shape {vectors.shape}, expected ({len(genes)}, {dim}) — one {dim}-d vector per gene, in "
                "the data's gene order; or use the text format 'SYMBOL v1 … vN' to align by gene name"
            )
        table = np.zeros((len(genes) + 1, dim), dtype=np.float32)
        table[: len(genes)] = vectors[: len(genes)]
        return torch.from_numpy(table)
    by_symbol: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if len(fields) <= 2:  # word2vec header "count dim" or a blank line
                continue
            if len(fields) != dim + 1:
                raise UserError(f"{path}:{line_number} has {len(fields) - 1} values, expected {dim} (the model's width)",
                                {"dim": None})
            try:
                by_symbol[fields[0]] = np.asarray(fields[1:], dtype=np.float32)
            except ValueError as err:
                raise UserError(f"{path}:{line_number}: not a number ({err})") from err
    table = np.zeros((len(genes) + 1, dim), dtype=np.float32)
    missing = 0
    for index, gene in enumerate(genes):
        if gene in by_symbol:
            table[index] = by_symbol[gene]
        else:
            missing += 1
    if missing == len(genes):
        raise UserError(f"no gene of the data has a vector in {path}; check that both use gene symbols")
    if missing:
        warnings.warn(f"{missing} of {len(genes)} genes have no gene2vec vector in {path}; they get zeros", stacklevel=2)
    return torch.from_numpy(table)
