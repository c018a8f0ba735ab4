"""The user's path, driven from a benchmark: `finetune_sparse.pipeline` on a training file, predict_updated on test cells.

Benchmarks that judge the method (accuracy_calibration, pruning_tradeoff) run what `bash train_sparse.sh demo` runs:
`finetune_sparse.pipeline` with the demo preset (presets/demo.json, the one source of presets), in this process. A
benchmark's settings are options on top of the preset, written `option=value` (every training stage) or
`STAGE.option=value` (one stage: A, B1 or B2), with finetune_sparse.py's option names.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

import finetune_sparse
import options
import predict_updated
from options import TrainConfig
from run_manifest import read_run
from utils import read_json

PRESET = "demo"
TRAINING_STAGES = tuple(finetune_sparse.PIPELINE_STAGES)  # ("A", "B1", "B2")


def preset_options(names: Iterable[str], stage: str, preset: str = PRESET) -> dict:
    """The values of the options `names` in one stage of a preset (the program's defaults where the preset sets
    none), converted as training converts them: e.g. prune_layers as a list."""
    names = list(names)
    values = {name: value for name, value in options.preset_values(preset, stage).items() if name in names}
    config = options.make(TrainConfig, values).as_dict()
    return {name: config[name] for name in names}


def parse_settings(pairs: Iterable[str]) -> dict[str, dict[str, str]]:
    """'option=value' (every training stage) and 'STAGE.option=value' (that stage only, and winning over the
    former) as options per stage: {"A": {...}, "B1": {...}, "B2": {...}}; empty strings are skipped.

    Names are checked here, values when the pipeline configures each stage (options.make).
    """
    every: dict[str, str] = {}
    own: dict[str, dict[str, str]] = {stage: {} for stage in TRAINING_STAGES}
    known = options.option_fields(TrainConfig)
    for pair in pairs:
        if not pair:
            continue
        name, has_value, value = pair.partition("=")
        stage, has_stage, option = name.strip().rpartition(".")
        if not has_value or option not in known or (has_stage and stage not in own):
            raise SystemExit(f"error: bad setting {pair!r}: write option=value (every training stage) or "
                             f"STAGE.option=value (STAGE: {', '.join(TRAINING_STAGES)}) with an option of finetune_sparse.py")
        (own[stage] if has_stage else every)[option] = value
    return {stage: every | own[stage] for stage in TRAINING_STAGES}


def run_pipeline(train_path: Path, run_dir: Path, stage_options: dict[str, dict], *,
                 stages: tuple[str, ...] = TRAINING_STAGES, start: Path | None = None,
                 log_name: str = "pipeline.log", reuse: bool = False) -> float:
    """`finetune_sparse.pipeline` with the demo preset on the training cells: `stages` into run_dir/stageA, stageB1,
    stageB2, each with the preset's values and its `stage_options` on top; returns the wall time.

    `start` is the model the first stage continues (default: the previous stage in run_dir). Every stage listed is
    trained afresh (a kept --work_dir never hands back an earlier run's models), unless `reuse` keeps the complete
    stages an earlier call trained (on the same cells: the caller's responsibility). Console output goes to
    run_dir/log_name, each stage's log into its own directory; a failure raises the pipeline's own error.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / log_name, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        finetune_sparse.pipeline(train_path, run_dir, PRESET, stages=stages, start=start, stage_options=stage_options,
                                 overwrite=not reuse, label_key="cell_type", device="cpu", verbose=False)
    return time.perf_counter() - started


def predict_stage(mc_samples: int, model_dir: Path, test_path: Path, out_dir: Path) -> tuple[np.ndarray, list[str], dict]:
    """predict_updated.py on the test cells: (mean probabilities, classes, its run summary)."""
    config = predict_updated.default_config(model_dir, data_path=str(test_path), bayes_mc_samples=mc_samples,
                                            output_dir=str(out_dir), device="cpu", overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = predict_updated.run(config)
    probs = pd.read_csv(out_dir / "probabilities.csv", index_col=0)
    return probs.to_numpy(), list(probs.columns), summary


def stage_info(stage_dir: Path) -> dict:
    """Size and pruning of a complete stage's fold models, from its manifest, its summary and its checkpoints."""
    run = read_run(stage_dir)
    folds = read_json(finetune_sparse.RunFiles(run.directory, run.name).summary)["folds"]
    return {"prune_amount": float(np.mean([f["prune_amount"] for f in folds])),
            "head_sparsity": float(np.mean([f["head_sparsity"] for f in folds])),
            "prune_amounts": [f["prune_amount"] for f in folds], "kept": [f.get("kept", "trained") for f in folds],
            "temperature": float(np.mean([f.get("temperature", 1.0) for f in folds])),
            "ensemble_temperature": float((run.manifest.get("calibration") or {}).get("temperature", 1.0)),
            "ensemble_temperature_fitted": float((run.manifest.get("calibration") or {}).get(
                "fitted", (run.manifest.get("calibration") or {}).get("temperature", 1.0))),
            "total_params": int(folds[0]["total_params"]), "folds": len(folds),
            "checkpoint_mb": sum(path.stat().st_size for path in run.members) / 2**20}
