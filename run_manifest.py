"""What a run directory is: one manifest, written last, that every reader goes through.

A training run writes `{name}_config.json` when it starts (its options and the fingerprint of its training data,
which `--resume` checks) and `manifest.json` when every fold is done: the options, the stage, the members (fold
models and their validation cells), the data's fingerprint, and `complete: true`. A directory without the
manifest is an unfinished run; prediction and Stage B refuse it instead of pooling whatever checkpoints it holds.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from backed_dataset import BackedMatrix, row_blocks
from utils import UserError, read_json, write_json

MANIFEST = "manifest.json"
RUN_FORMAT = "bayesian-sparse-transformer-run/1"
CONFIG_SUFFIX = "_config.json"


# --------------------------------------------------------------------------------------------------------------
# The training data's fingerprint
# --------------------------------------------------------------------------------------------------------------


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)
    return hasher.hexdigest()[:16]


def _text_digest(values) -> str:
    return _digest("\n".join(map(str, values)).encode("utf-8"))


def data_fingerprint(matrix: sp.spmatrix | BackedMatrix, cell_ids, genes, labels) -> dict:
    """Hashes of the training cells, genes, expression values and labels: what --resume must find unchanged.

    The values are hashed a block of rows at a time, so a matrix in memory and the same matrix on disk (--backed)
    give one digest, and no copy of a whole matrix is made."""
    row_sizes, indices, values = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for block in row_blocks(matrix):  # (cells, genes) csr, indices sorted
        row_sizes.update(np.diff(block.indptr).astype(np.int64).tobytes())
        indices.update(np.asarray(block.indices, dtype=np.int64).tobytes())
        values.update(np.asarray(block.data, dtype=np.float32).tobytes())
    n_cells, n_genes = matrix.shape
    return {"n_cells": int(n_cells), "n_genes": int(n_genes), "cells": _text_digest(cell_ids),
            "genes": _text_digest(genes), "values": _digest(row_sizes.digest(), indices.digest(), values.digest()),
            "labels": _text_digest(labels)}


def fingerprint_changes(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words ('the expression values', '700 -> 650 cells')."""
    words = {"cells": "the cell ids", "genes": "the genes", "values": "the expression values", "labels": "the labels"}
    changes = []
    for key in ("n_cells", "n_genes"):
        if saved.get(key) != current.get(key):
            changes.append(f"{saved.get(key)} -> {current.get(key)} {key[2:]}")
    changes += [words[key] for key in words if saved.get(key) != current.get(key)]
    return changes


# --------------------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A complete run directory as its manifest describes it."""

    directory: Path
    name: str
    stage: str
    members: list[Path]  # fold checkpoints, fold order
    manifest: dict

    @property
    def options(self) -> dict:
        return self.manifest["options"]


def config_files(directory: Path) -> dict[str, Path]:
    """The runs started in `directory`, by name (each wrote {name}_config.json when it began)."""
    return {path.name[: -len(CONFIG_SUFFIX)]: path for path in sorted(directory.glob(f"*{CONFIG_SUFFIX}"))}


def write_manifest(directory: Path, *, name: str, stage: str, options: dict, members: list[dict], fingerprint: dict,
                   classes: list[str], genes: int, model_config: dict, calibration: dict | None = None) -> None:
    """Mark the run complete: written last, atomically, after every member's files are in place. `options` are the
    run's settings; `model_config` the members' architecture (fixed by a continued checkpoint, not by options);
    `calibration` the ensemble's temperature (see `ensemble_temperature`)."""
    write_json(directory / MANIFEST, {
        "format": RUN_FORMAT, "complete": True, "name": name, "stage": stage, "options": options, "members": members,
        "data_fingerprint": fingerprint, "classes": classes, "n_genes": genes, "model_config": model_config,
        "calibration": calibration,
    })


def ensemble_temperature(path: str | os.PathLike) -> float:
    """The temperature a run fitted for its pooled ensemble (1: none, or a single checkpoint file)."""
    directory = Path(path)
    if not (directory / MANIFEST).is_file():
        return 1.0
    calibration = read_json(directory / MANIFEST).get("calibration") or {}
    return float(calibration.get("temperature", 1.0))


def mark_incomplete(directory: Path) -> None:
    """Before a run's files change (--overwrite, --resume), the directory stops being a complete run."""
    (directory / MANIFEST).unlink(missing_ok=True)


def read_run(path: str | os.PathLike, *, purpose: str = "predict with it") -> Run:
    """The complete run in directory `path`; UserError naming what is wrong (unfinished, several runs, not a run)."""
    directory = Path(path)
    started = config_files(directory)
    if len(started) > 1:
        raise UserError(f"{directory} holds {len(started)} runs ({', '.join(started)}); a run directory holds one run: "
                        "move each into its own directory")
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        if started:
            name = next(iter(started))
            unfinished = _unfinished_folds(directory, name, read_json(started[name]).get("args", {}).get("cv_splits", 1))
            raise UserError(f"{directory} holds the unfinished run {name!r} (fold(s) {', '.join(map(str, unfinished))} not "
                            f"done); finish it with the same command and --resume before you {purpose}")
        stages = sorted(sub.name for sub in directory.glob(f"*/{MANIFEST}") for sub in [sub.parent])
        if stages:
            raise UserError(f"{directory} holds the runs {', '.join(stages)} (a pipeline's stages); pass one of them, "
                            f"e.g. {directory / stages[-1]}")
        raise UserError(f"{directory} is not a run directory of finetune_sparse.py (no {MANIFEST}); pass a run "
                        "directory or one checkpoint file")
    manifest = read_json(manifest_path)
    if manifest.get("format") != RUN_FORMAT or not manifest.get("complete"):
        raise UserError(f"{manifest_path} is not a complete run's manifest; rerun the training with --resume")
    if started and set(started) != {manifest["name"]}:
        raise UserError(f"{directory} holds the run {manifest['name']!r} and also {', '.join(set(started) - {manifest['name']})}; "
                        "a run directory holds one run: move the others out")
    members = [directory / member["checkpoint"] for member in manifest["members"]]
    missing = [path.name for path in members if not path.exists()]
    if missing:
        raise UserError(f"{directory}: the manifest lists {', '.join(missing)}, which is missing; restore it or retrain")
    return Run(directory, manifest["name"], manifest["stage"], members, manifest)


def _unfinished_folds(directory: Path, name: str, folds: int) -> list[int]:
    unfinished = [fold for fold in range(folds) if not (directory / f"{name}{fold}_val_predictions.csv").exists()]
    return unfinished or list(range(folds))
