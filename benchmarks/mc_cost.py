"""Cost of Monte Carlo prediction: head-only sampling vs running the whole model per sample vs one forward (CPU).

The encoder is deterministic, so `predict_proba_samples` encodes a batch once and samples only the Bayesian
head (S networks at once). The naive way runs the full model S times, each with fresh head weights. Both are
compared with one deterministic forward (posterior means) on the same batch, at scBERT's encoder size.

    python -m benchmarks.mc_cost            # dim 200, depth 6; 767 tokens (batch 8) and 16,907 (batch 1)
    python -m benchmarks.mc_cost --smoke
"""

from __future__ import annotations

import sys

import torch
from matplotlib.figure import Figure

from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig, predict_proba_samples
from benchmarks.common import Report, paired, parse_config, time_call
from performer_pytorch import PerformerConfig

NAME = "mc_cost"
METHODS = ("deterministic", "head_mc", "naive_mc")
LABELS = {"deterministic": "1 deterministic forward", "head_mc": "head-only MC (predict_proba_samples)",
          "naive_mc": "naive MC (S full forwards)"}
REAL = dict(
    seq_lens=[767, 16907], batch_sizes=[8, 1], dim=200, depth=6, heads=10, dim_head=64, hidden1=512, hidden2=128,
    classes=10, samples=8, warmup=1, repeats=3, seed=0,
)
SMOKE = REAL | dict(seq_lens=[65], batch_sizes=[4], dim=32, depth=1, heads=2, dim_head=16, hidden1=32, hidden2=16,
                    repeats=2)


def build_model(config: dict, seq_len: int) -> BayesianSparseTransformer:
    torch.manual_seed(config["seed"])
    encoder = PerformerConfig(num_tokens=7, max_seq_len=seq_len, dim=config["dim"], depth=config["depth"],
                              heads=config["heads"], dim_head=config["dim_head"])
    head = HeadConfig(seq_len=seq_len, dim=config["dim"], num_classes=config["classes"], hidden1=config["hidden1"],
                      hidden2=config["hidden2"], bayes=True, init_log_sigma=-3.0)
    return BayesianSparseTransformer(ModelConfig(encoder, head)).eval()


def measure(config: dict, seq_len: int, batch: int) -> dict:
    model = build_model(config, seq_len)
    generator = torch.Generator().manual_seed(config["seed"])
    tokens = torch.randint(0, 7, (batch, seq_len), generator=generator)  # (batch, genes+1)
    loader = [(tokens, torch.zeros(batch, dtype=torch.long))]
    samples = config["samples"]

    def deterministic() -> torch.Tensor:
        model.set_deterministic(True)
        with torch.no_grad():
            return model(tokens).softmax(-1)  # (batch, classes)

    def head_mc() -> torch.Tensor:
        model.set_deterministic(False)
        probs = predict_proba_samples(model, loader, samples, seed=config["seed"], cells=batch)  # (S, batch, classes)
        return torch.from_numpy(probs)

    def naive_mc() -> torch.Tensor:
        model.set_deterministic(False)
        with torch.no_grad():  # every call of the model draws fresh head weights
            return torch.stack([model(tokens).softmax(-1) for _ in range(samples)])  # (S, batch, classes)

    functions = {"deterministic": deterministic, "head_mc": head_mc, "naive_mc": naive_mc}
    result: dict = {"seq_len": seq_len, "batch": batch, "samples": samples,
                    "parameters": sum(p.numel() for p in model.parameters())}
    result["max_sample_std"] = {}  # > 0: the samples really differ
    for name, fn in functions.items():
        output = fn()  # the first warm-up call, kept to check the output
        if name != "deterministic":
            result["max_sample_std"][name] = float(output.std(0).max())
        timing = time_call(fn, warmup=max(config["warmup"] - 1, 0), repeats=config["repeats"])
        result[name] = timing | {"cells_per_s": batch / timing["median_s"], "output_shape": list(output.shape)}
    result["naive_over_head_mc"] = result["naive_mc"]["median_s"] / result["head_mc"]["median_s"]
    result["head_mc_over_deterministic"] = result["head_mc"]["median_s"] / result["deterministic"]["median_s"]
    model.set_deterministic(False)
    return result


def cost_figure(rows: list[dict]) -> Figure:
    figure = Figure(figsize=(6, 3.5))
    ax = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(METHODS)
    for index, method in enumerate(METHODS):
        xs = [i + (index - 1) * width for i in range(len(rows))]
        ax.bar(xs, [1e3 * r[method]["median_s"] / r["batch"] for r in rows], width, label=LABELS[method])
    ax.set_xticks(range(len(rows)), [f"{r['seq_len']} tokens" for r in rows])
    ax.set_ylabel("ms per cell")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"{rows[0]['samples']} Monte Carlo samples", fontsize=9)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Monte Carlo prediction cost: head-only vs naive vs deterministic", config, args.out_dir)
    rows = []
    for seq_len, batch in paired(config, "seq_lens", "batch_sizes"):
        rows.append(measure(config, seq_len, batch))
        print(f"  {seq_len} tokens: naive/head-MC {rows[-1]['naive_over_head_mc']:.2f}x, "
              f"head-MC/deterministic {rows[-1]['head_mc_over_deterministic']:.2f}x")
    report.results["sequences"] = rows
    report.table(
        f"Median time per batch ({config['samples']} samples) and ratios",
        ["tokens", "batch", "deterministic ms", "head-only MC ms", "naive MC ms", "naive / head-only",
         "head-only / deterministic"],
        [[r["seq_len"], r["batch"], 1e3 * r["deterministic"]["median_s"], 1e3 * r["head_mc"]["median_s"],
          1e3 * r["naive_mc"]["median_s"], r["naive_over_head_mc"], r["head_mc_over_deterministic"]] for r in rows],
    )
    naive = [r["naive_over_head_mc"] for r in rows]
    overhead = [r["head_mc_over_deterministic"] for r in rows]
    where = lambda values: ", ".join(f"{v:.2f}x at {r['seq_len']} tokens" for v, r in zip(values, rows))
    report.add_target("head-only MC ≥ 5x faster than the naive way", min(naive) >= 5, where(naive))
    report.add_target("head-only MC ≤ 1.5x one deterministic forward", max(overhead) <= 1.5, where(overhead))
    report.notes += [
        "head-only MC is timed through predict_proba_samples on a one-batch loader, so it includes drawing the "
        "head noise (done once per dataset in real use) and the conversion to numpy.",
        "Weights are random (timing does not depend on them); log sigma -3 so that the samples visibly differ.",
    ]
    report.save_figure(cost_figure(rows), "cost")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
