"""Run every benchmark, one fresh process each, then write SUMMARY.md (all targets and tables) next to the results.

    python -m benchmarks.run_all                 # real configurations (see benchmarks/README.md for run times)
    python -m benchmarks.run_all --smoke         # seconds each, results under benchmarks/results/smoke/
    python -m benchmarks.run_all --only speed_reference mc_cost
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import DEFAULT_THREADS, RESULTS_DIR, ROOT, SMOKE_RESULTS_DIR, markdown_table

BENCHMARKS = ("speed_reference", "encoder_profile", "scaling", "mc_cost", "memory", "novelty_fit", "scale",
              "backed_training", "pruning_tradeoff", "calibration_inner", "accuracy_calibration", "novel_type")


def write_summary(out_dir: Path, statuses: dict[str, str]) -> Path:
    """SUMMARY.md: one table of every target (met or missed), then each benchmark's own markdown."""
    rows, sections = [], []
    for name in BENCHMARKS:
        json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
        if not json_path.exists():
            continue
        payload = json.loads(json_path.read_text(encoding="utf-8"))
        for t in payload["targets"]:
            rows.append([name, t["target"], "MET" if t["met"] else "MISSED", t["detail"]])
        sections.append(md_path.read_text(encoding="utf-8"))
    lines = ["# Benchmark results", ""]
    if statuses:
        lines += ["This run: " + ", ".join(f"{name} {status}" for name, status in statuses.items()) + ".", ""]
    lines += ["## Targets", "", markdown_table(["benchmark", "target", "verdict", "numbers"], rows), ""]
    path = out_dir / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n" + "\n".join(sections), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configurations (seconds each)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run")
    parser.add_argument("--out_dir", default=None, help=f"default {RESULTS_DIR} (smoke: {SMOKE_RESULTS_DIR})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads for every benchmark")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir or (SMOKE_RESULTS_DIR if args.smoke else RESULTS_DIR))
    statuses = {}
    for name in args.only:
        command = [sys.executable, "-m", f"benchmarks.{name}", "--out_dir", str(out_dir), "--threads", str(args.threads)]
        if args.smoke:
            command.append("--smoke")
        print(f"== {name} ==", flush=True)
        started = time.perf_counter()
        status = subprocess.run(command, cwd=ROOT).returncode  # a failure is reported, the others still run
        statuses[name] = f"{'ok' if status == 0 else f'FAILED (exit {status})'} in {time.perf_counter() - started:.0f} s"
        print(f"== {name}: {statuses[name]}", flush=True)
    summary = write_summary(out_dir, statuses)
    print(f"wrote {summary}")
    return 0 if all(s.startswith("ok") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
