"""Shared pieces of the benchmarks: config parsing, machine record, timing, results (JSON, markdown, PNG).

Every benchmark writes `{name}.json` (machine, exact config, results, targets), `{name}.md` (tables) and its
plots into one output directory. This module imports only the standard library, numpy and torch at the top, so
the speed worker (run where the installed reference `performer_pytorch` must win) can import it too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
SMOKE_RESULTS_DIR = RESULTS_DIR / "smoke"  # smoke runs never overwrite the real results
DEFAULT_THREADS = 2
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --------------------------------------------------------------------------------------------------------------
# Command line: a config dict whose every key is an option; --smoke swaps in the tiny config
# --------------------------------------------------------------------------------------------------------------


def parse_config(
    description: str, real: dict[str, Any], smoke: dict[str, Any], argv: Sequence[str] | None = None
) -> tuple[dict[str, Any], argparse.Namespace]:
    """Parse `--smoke`, `--out_dir`, `--threads` and one `--key` per config entry (lists take several values).

    Returns (config, args): the real or smoke config with the options given on the command line applied on top.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration that runs in seconds (for CI)")
    parser.add_argument("--out_dir", default=None, help=f"where results go (default {RESULTS_DIR}, smoke: {SMOKE_RESULTS_DIR})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads (fixed for every timing)")
    group = parser.add_argument_group("benchmark configuration (real defaults shown; --smoke changes them)")
    for key, value in real.items():
        option = f"--{key}"
        if isinstance(value, bool):
            group.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=f"default {value}")
        elif isinstance(value, (list, tuple)):
            kind = type(value[0]) if value else str
            group.add_argument(option, nargs="+", type=kind, default=None, help=f"default {' '.join(map(str, value))}")
        else:
            group.add_argument(option, type=type(value), default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    config = dict(smoke if args.smoke else real)
    for key in real:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config["threads"] = args.threads
    config["smoke"] = args.smoke
    if args.out_dir is None:
        args.out_dir = str(SMOKE_RESULTS_DIR if args.smoke else RESULTS_DIR)
    return config, args


# --------------------------------------------------------------------------------------------------------------
# Machine and threads
# --------------------------------------------------------------------------------------------------------------


def paired(config: dict[str, Any], first: str, second: str) -> list[tuple[Any, Any]]:
    """Zip two list options that go together (e.g. sequence lengths and their batch sizes), checking their lengths."""
    if len(config[first]) != len(config[second]):
        raise SystemExit(f"--{first} and --{second} need the same number of values")
    return list(zip(config[first], config[second]))


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (and the BLAS/OpenMP variables that child processes inherit)."""
    torch.set_num_threads(threads)
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)


def thread_env(threads: int, *, pythonpath: str | None = None) -> dict[str, str]:
    """Environment for a worker subprocess: the same thread settings; PYTHONPATH replaced (None: removed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({name: str(threads) for name in THREAD_ENV_VARS})
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """CPU, threads, load and package versions, recorded in every result file."""
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name in ("numpy", "scipy", "scikit-learn", "anndata", "scanpy", "einops", "performer-pytorch", "matplotlib"):
        versions[name] = _version(name)
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "versions": versions,
    }


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def timing_summary(times: Sequence[float]) -> dict[str, Any]:
    """Median (the reported number), min, max and all repeats, in seconds."""
    times = [float(t) for t in times]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times),
            "times_s": times}


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; see `timing_summary`."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return timing_summary(times)


def matmul_peak_gflops(size: int = 2048, *, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """This machine's practical fp32 peak at the current thread count: GFLOP/s of a (size x size) @ (size x size)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    timing = time_call(lambda: torch.matmul(a, b), warmup=warmup, repeats=repeats)
    flops = 2 * size**3
    return {"size": size, "gflops": flops / timing["median_s"] / 1e9, "timing": timing}


# --------------------------------------------------------------------------------------------------------------
# Memory (resident set of this process)
# --------------------------------------------------------------------------------------------------------------


def rss_mb() -> dict[str, float]:
    """Current and peak resident memory (MB) from /proc; falls back to getrusage's peak only."""
    try:
        status = Path("/proc/self/status").read_text()
        return {key: int(re.search(rf"{key}:\s+(\d+)", status)[1]) / 1024 for key in ("VmRSS", "VmHWM")}
    except (OSError, TypeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"VmRSS": float("nan"), "VmHWM": peak}


def reset_peak_rss() -> bool:
    """Reset the peak resident memory to the current one (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and (population) standard deviation over splits/repeats, NaN-aware, with the values themselves."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    mean = float(finite.mean()) if finite.size else float("nan")
    std = float(finite.std()) if finite.size else float("nan")
    return {"mean": mean, "std": std, "n": int(finite.size), "values": array.tolist()}


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, mean/std dicts as 'mean ± std', None/NaN as '–'."""
    if isinstance(value, dict) and "mean" in value:
        if value["mean"] is None or not math.isfinite(value["mean"]):
            return "–"
        return f"{fmt(value['mean'], digits)} ± {fmt(value['std'], digits)}"
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell, digits) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def target(name: str, met: bool, detail: str) -> dict[str, Any]:
    """One target of the issue: its wording, whether this run met it, and the numbers behind the verdict."""
    return {"target": name, "met": bool(met), "detail": detail}


def _json_safe(obj: Any) -> Any:
    """NaN/inf become None (strict JSON); numpy scalars/arrays and paths become plain values."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Report:
    """Collects one benchmark's results and writes them: `{name}.json`, `{name}.md` and the plots (PNG)."""

    def __init__(self, name: str, title: str, config: dict[str, Any], out_dir: str | os.PathLike):
        self.name, self.title, self.config = name, title, dict(config)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        set_threads(self.config["threads"])
        self.machine = machine_info()
        self.started = time.perf_counter()
        self.results: dict[str, Any] = {}
        self.tables: list[tuple[str, list[str], list[list[Any]]]] = []
        self.targets: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.plots: list[str] = []

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append((title, list(headers), [list(row) for row in rows]))

    def add_target(self, name: str, met: bool, detail: str) -> None:
        self.targets.append(target(name, met, detail))

    def save_figure(self, figure: Any, stem: str) -> Path:
        """Write a matplotlib Figure (object API, no pyplot or GUI backend) as `{name}_{stem}.png`."""
        path = self.out_dir / f"{self.name}_{stem}.png"
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        path.write_bytes(buffer.getvalue())
        self.plots.append(path.name)
        return path

    def payload(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "title": self.title,
            "smoke": bool(self.config.get("smoke")),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - self.started,
            "machine": self.machine | {"load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "config": self.config,
            "results": self.results,
            "targets": self.targets,
            "notes": self.notes,
            "plots": self.plots,
        }

    def markdown(self, payload: dict[str, Any]) -> str:
        machine = payload["machine"]
        lines = [f"## {self.title}{' (smoke configuration)' if payload['smoke'] else ''}", ""]
        lines.append(
            f"{machine['cpu_model']}, {machine['cpus_available']} CPUs, torch {machine['versions']['torch']} with "
            f"{machine['torch_threads']} threads; load average at start {fmt(machine['load_average_1_5_15min'])}; "
            f"wall time {payload['wall_s']:.0f} s; finished {payload['finished']}."
        )
        lines += ["", "Config: `" + json.dumps(self.config, sort_keys=True) + "`", ""]
        for title, headers, rows in self.tables:
            lines += [f"**{title}**", "", markdown_table(headers, rows), ""]
        if self.targets:
            lines += ["**Targets**", ""]
            lines += [f"- {'MET' if t['met'] else 'MISSED'}: {t['target']} — {t['detail']}" for t in self.targets]
            lines.append("")
        if self.notes:
            lines += ["**Notes**", ""] + [f"- {note}" for note in self.notes] + [""]
        lines += [f"![{stem}]({stem})" for stem in self.plots]
        return "\n".join(lines).rstrip() + "\n"

    def write(self) -> Path:
        """Write JSON (strict: NaN becomes null) and markdown atomically; return the JSON path."""
        from utils import atomic_write  # the repository's helper; imported here so the speed worker never needs it

        payload = _json_safe(self.payload())
        json_path = self.out_dir / f"{self.name}.json"
        with atomic_write(json_path) as handle:
            handle.write(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
        with atomic_write(self.out_dir / f"{self.name}.md") as handle:
            handle.write(self.markdown(payload))
        print(f"{self.name}: wrote {json_path} ({payload['wall_s']:.1f} s)")
        for t in self.targets:
            print(f"  {'MET' if t['met'] else 'MISSED'}: {t['target']} — {t['detail']}")
        return json_path


# --------------------------------------------------------------------------------------------------------------
# Worker subprocesses (fresh interpreters: clean peak memory, or the reference package on the path)
# --------------------------------------------------------------------------------------------------------------

WORKER_RESULT_PREFIX = "BENCHMARK_RESULT "


def emit_worker_result(result: dict[str, Any]) -> None:
    """A worker's answer: one JSON line on stdout, found by `run_worker` among whatever else was printed."""
    print(WORKER_RESULT_PREFIX + json.dumps(_json_safe(result)), flush=True)


def run_worker(command: Sequence[str], *, env: dict[str, str], cwd: str | os.PathLike, timeout: float) -> dict[str, Any]:
    """Run a worker subprocess and return its JSON answer; RuntimeError with its stderr tail if it fails."""
    completed = subprocess.run(list(command), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(WORKER_RESULT_PREFIX):
            return json.loads(line[len(WORKER_RESULT_PREFIX):])
    tail = "\n".join((completed.stderr or completed.stdout).splitlines()[-15:])
    raise RuntimeError(f"worker {' '.join(command[:4])} … failed with exit status {completed.returncode}:\n{tail}")


