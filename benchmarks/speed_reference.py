"""Encoder throughput of our FAVOR+ PerformerLM against performer-pytorch 1.1.4 at scBERT's configuration (CPU).

Both implementations run in fresh subprocesses with the same thread count, alternating (ours, reference, then
reference, ours, ...) so that a change in machine load hits both alike; each round contributes `repeats` timed
calls after `warmup` untimed ones, and the median over all rounds is reported. Both load the same weights (the
reference's, mapped with `convert_scbert_state_dict`), and the outputs are compared as a sanity check.

    python -m benchmarks.speed_reference            # dim 200, depth 6, heads 10, sequences 767 and 16,907
    python -m benchmarks.speed_reference --smoke
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from benchmarks.common import (
    BENCHMARKS_DIR,
    ROOT,
    Report,
    matmul_peak_gflops,
    paired,
    parse_config,
    run_worker,
    thread_env,
    timing_summary,
)

NAME = "speed_reference"
REAL = dict(
    seq_lens=[767, 16907], batch_sizes=[4, 1], dim=200, depth=6, heads=10, dim_head=64, nb_features=0, num_tokens=7,
    warmup=1, repeats=3, rounds=2, seed=0, peak_size=2048, worker_timeout_s=1200,
)
SMOKE = REAL | dict(seq_lens=[65], batch_sizes=[2], dim=32, depth=1, heads=2, dim_head=16, repeats=2, rounds=1, peak_size=256,
                    worker_timeout_s=120)
WORKER = BENCHMARKS_DIR / "speed_worker.py"
MODES = ("forward", "forward_backward")


def default_nb_features(dim_head: int) -> int:
    return int(dim_head * math.log(dim_head))  # the paper's d·ln(d), the default of both implementations


def encoder_flops_per_cell(seq_len: int, dim: int, depth: int, heads: int, dim_head: int, nb_features: int,
                           ff_mult: int = 4) -> dict[str, float]:
    """Forward FLOPs (multiply-add = 2) of one cell through the encoder, counted analytically per layer.

    With n = seq_len, D = dim, H = heads, d = dim_head, m = nb_features, I = H·d:
      QKV projections        2·n·D·3I
      FAVOR+ feature maps    2 · 2·n·H·d·m           (q and k onto m random features; exp/norms O(n·H·m) ignored)
      linear attention       2·(2·n·H·m·d) + 2·(2·n·H·m)   (Kᵀ'V and Q'(Kᵀ'V); key sums and denominators)
      output projection      2·n·I·D
      feed-forward           2 · 2·n·D·(ff_mult·D)
    times depth. Embeddings, LayerNorms, GELU and the softmax-kernel exponentials are elementwise and left out
    (under 2 % here). Forward+backward is counted as 3x forward (the usual rule: backward = 2x forward).
    """
    n, D, H, d, m = seq_len, dim, heads, dim_head, nb_features
    inner = H * d
    parts = {
        "qkv": 2 * n * D * 3 * inner,
        "feature_maps": 2 * (2 * n * H * d * m),
        "linear_attention": 2 * (2 * n * H * m * d) + 2 * (2 * n * H * m),
        "out_proj": 2 * n * inner * D,
        "ffn": 2 * (2 * n * D * ff_mult * D),
    }
    per_layer = sum(parts.values())
    return {"per_layer": {k: float(v) for k, v in parts.items()}, "forward": float(per_layer * depth),
            "forward_backward": float(3 * per_layer * depth)}


def run_impl(impl: str, spec: dict, threads: int, timeout: float) -> dict:
    # Ours: the repository on PYTHONPATH. Reference: no PYTHONPATH, so the installed package wins.
    env = thread_env(threads, pythonpath=str(ROOT) if impl == "ours" else None)
    command = [sys.executable, str(WORKER), impl, json.dumps(spec)]
    return run_worker(command, env=env, cwd=Path(spec["weights_path"]).parent, timeout=timeout)


def measure_sequence(config: dict, seq_len: int, batch: int, workdir: Path) -> dict:
    nb_features = config["nb_features"] or default_nb_features(config["dim_head"])
    spec = {key: config[key] for key in ("dim", "depth", "heads", "dim_head", "num_tokens", "seed", "warmup", "repeats")}
    spec |= {"seq_len": seq_len, "batch": batch, "nb_features": nb_features, "threads": config["threads"],
             "weights_path": str(workdir / f"reference_{seq_len}.pt")}
    timeout = config["worker_timeout_s"]
    init = run_impl("reference-init", spec, config["threads"], timeout)
    times: dict[str, dict[str, list[float]]] = {impl: {mode: [] for mode in MODES} for impl in ("ours", "reference")}
    check = {}
    for round_index in range(config["rounds"]):
        order = ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours")
        for impl in order:
            answer = run_impl(impl, spec | {"check": impl == "ours" and round_index == 0}, config["threads"], timeout)
            for mode in MODES:
                times[impl][mode] += answer["timing"][mode]["times_s"]
            if "max_abs_diff" in answer:
                check = {k: answer[k] for k in ("max_abs_diff", "mean_abs_diff", "encoding_abs_max")}
                check["ours_location"] = answer["performer_pytorch"]
    flops = encoder_flops_per_cell(seq_len, config["dim"], config["depth"], config["heads"], config["dim_head"],
                                   nb_features)
    result = {"seq_len": seq_len, "batch": batch, "nb_features": nb_features, "parameters": init["parameters"],
              "reference_location": init["performer_pytorch"], "output_check": check, "flops_per_cell": flops}
    for impl in ("ours", "reference"):
        result[impl] = {}
        for mode in MODES:
            timing = timing_summary(times[impl][mode])
            cells_per_s = batch / timing["median_s"]
            result[impl][mode] = timing | {"cells_per_s": cells_per_s, "achieved_gflops": flops[mode] * cells_per_s / 1e9}
    for mode in MODES:
        result[f"speedup_{mode}"] = result["ours"][mode]["cells_per_s"] / result["reference"][mode]["cells_per_s"]
    return result


def throughput_figure(rows: list[dict]) -> Figure:
    figure = Figure(figsize=(7, 3.5))
    for index, mode in enumerate(MODES):
        ax = figure.add_subplot(1, 2, index + 1)
        labels = [str(r["seq_len"]) for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["ours"][mode]["cells_per_s"] for r in rows], 0.4, label="ours")
        ax.bar([i + 0.2 for i in x], [r["reference"][mode]["cells_per_s"] for r in rows], 0.4, label="performer-pytorch 1.1.4")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("sequence length (genes + 1)")
        ax.set_ylabel("cells / s")
        ax.set_yscale("log")
        ax.set_title(mode.replace("_", "+"))
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    sequences = paired(config, "seq_lens", "batch_sizes")
    report = Report(NAME, "Encoder speed: ours vs performer-pytorch 1.1.4 (CPU)", config, args.out_dir)
    peak = matmul_peak_gflops(config["peak_size"])
    report.results["matmul_peak"] = peak
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as workdir:
        for seq_len, batch in sequences:
            row = measure_sequence(config, seq_len, batch, Path(workdir))
            for impl in ("ours", "reference"):
                for mode in MODES:
                    row[impl][mode]["peak_fraction"] = row[impl][mode]["achieved_gflops"] / peak["gflops"]
            rows.append(row)
            print(f"  seq {seq_len}: forward {row['speedup_forward']:.2f}x, forward+backward "
                  f"{row['speedup_forward_backward']:.2f}x, max |diff| {row['output_check'].get('max_abs_diff')}")
    report.results["sequences"] = rows
    report.table(
        "Throughput (cells/s, median over all rounds) and the ratio ours / reference",
        ["seq", "batch", "mode", "ours cells/s", "reference cells/s", "speed-up", "GFLOP/cell", "ours % of peak",
         "ref % of peak"],
        [[r["seq_len"], r["batch"], mode.replace("_", "+"), r["ours"][mode]["cells_per_s"],
          r["reference"][mode]["cells_per_s"], r[f"speedup_{mode}"], r["flops_per_cell"][mode] / 1e9,
          100 * r["ours"][mode]["peak_fraction"], 100 * r["reference"][mode]["peak_fraction"]]
         for r in rows for mode in MODES],
    )
    report.table("Same weights, same outputs (eval mode)", ["seq", "max abs diff", "mean abs diff", "max |encoding|"],
                 [[r["seq_len"], r["output_check"]["max_abs_diff"], r["output_check"]["mean_abs_diff"],
                   r["output_check"]["encoding_abs_max"]] for r in rows])
    for mode in MODES:
        speedups = [r[f"speedup_{mode}"] for r in rows]
        detail = ", ".join(f"{s:.2f}x at seq {r['seq_len']}" for s, r in zip(speedups, rows))
        report.add_target(f"≥ 1.5x the reference's {mode.replace('_', '+')} throughput", min(speedups) >= 1.5, detail)
    report.notes += [
        f"fp32 matmul peak: {peak['gflops']:.1f} GFLOP/s ({peak['size']}x{peak['size']} torch.matmul, "
        f"{config['threads']} threads); '% of peak' = analytic model FLOPs x cells/s / that peak.",
        "FLOPs per cell are counted analytically (see encoder_flops_per_cell): QKV, FAVOR+ feature maps, linear "
        "attention, output projection, feed-forward; forward+backward = 3x forward.",
        "Each implementation ran in its own subprocess with the same OMP/MKL thread settings; rounds alternate the order.",
    ]
    report.save_figure(throughput_figure(rows), "throughput")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
