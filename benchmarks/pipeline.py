"""The user's path, driven from a benchmark: the shell pipelines on a training file, predict_updated.py on test cells.

Benchmarks that judge the method (accuracy_calibration, pruning_tradeoff) run exactly what a user runs:
`train_sparse.sh demo` or one of its rounds (PRESET=demo), with settings as the environment variables of pipeline_common.sh.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import finetune_sparse
import predict_updated
from benchmarks.common import ROOT
from utils import read_json


def settings(pairs: list[str]) -> dict[str, str]:
    """VAR=VALUE strings (a config's preset overrides) as an environment mapping; empty strings are skipped."""
    return dict(pair.split("=", 1) for pair in pairs if pair)


def preset_settings(names: tuple[str, ...], preset: str = "demo") -> dict[str, str]:
    """The preset's values of the setting `names`, read from pipeline_common.sh itself (the one source of presets)."""
    script = f"PRESET={preset}; source pipeline_common.sh; " + "; ".join(f'echo "${name}"' for name in names)
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # no inherited settings
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=clean_env, capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def preset_config(names: tuple[str, ...], preset: str = "demo") -> dict[str, int | float]:
    """`preset_settings` as a benchmark config: lower-case keys, numbers as int or float."""
    return {name.lower(): int(value) if value.lstrip("-").isdigit() else float(value)
            for name, value in preset_settings(names, preset).items()}


def run_script(script: str, train_path: Path, run_dir: Path, env_settings: dict[str, str], log_name: str = "pipeline.log") -> float:
    """`PRESET=demo bash SCRIPT` on the training cells with pipeline settings; returns its wall time.

    The log goes to run_dir/log_name; a failure raises with the log's tail.
    """
    # The scripts call `python`: this interpreter's (a virtual environment's) must come first on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "DATA_PATH": str(train_path), "LABEL_KEY": "cell_type", "RUN_DIR": str(run_dir),
           "DEVICE": "cpu", "PRESET": "demo"} | env_settings
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / log_name
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run(["bash", str(ROOT / script)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8").splitlines()[-15:])
        raise RuntimeError(f"{script} failed (exit {completed.returncode}):\n{tail}")
    return time.perf_counter() - started


def predict_stage(mc_samples: int, model_dir: Path, test_path: Path, out_dir: Path) -> tuple[np.ndarray, list[str], dict]:
    """predict_updated.py on the test cells: (mean probabilities, classes, its run summary)."""
    config = predict_updated.default_config(model_dir, data_path=str(test_path), bayes_mc_samples=mc_samples,
                                            output_dir=str(out_dir), device="cpu", overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = predict_updated.run(config)
    probs = pd.read_csv(out_dir / "probabilities.csv", index_col=0)
    return probs.to_numpy(), list(probs.columns), summary


def stage_info(run_dir: Path, stage: str) -> dict:
    """Size and pruning of a stage's fold models, from its summary and its checkpoint files."""
    files = finetune_sparse.RunFiles(run_dir / stage, stage)  # the pipeline names each stage's outputs after it
    folds = read_json(files.summary)["folds"]
    checkpoints = [files.fold(fold, "best.pth") for fold in range(len(folds))]
    return {"prune_amount": float(np.mean([f["prune_amount"] for f in folds])),
            "head_sparsity": float(np.mean([f["head_sparsity"] for f in folds])),
            "prune_amounts": [f["prune_amount"] for f in folds],
            "temperature": float(np.mean([f.get("temperature", 1.0) for f in folds])),
            "total_params": int(folds[0]["total_params"]), "folds": len(folds),
            "checkpoint_mb": sum(p.stat().st_size for p in checkpoints) / 2**20}
