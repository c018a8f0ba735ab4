"""Time one Performer encoder implementation in a fresh interpreter (used by speed_reference.py; not run by hand).

Usage: python benchmarks/speed_worker.py {reference-init,reference,ours} SPEC_JSON

Run by file path, never with `-m`: the caller sets PYTHONPATH to the repository for `ours` and leaves it unset for
the reference, so that `import performer_pytorch` finds our package or the installed performer-pytorch 1.1.4
(both use that name). `reference-init` builds the reference model from a seed and saves its weights, tokens and
eval-mode encodings; `reference` and `ours` load those weights and time forward and forward+backward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from common import emit_worker_result, set_threads, time_call  # this file's folder is sys.path[0]


def build_reference(spec: dict) -> torch.nn.Module:
    import performer_pytorch

    model = performer_pytorch.PerformerLM(
        num_tokens=spec["num_tokens"], max_seq_len=spec["seq_len"], dim=spec["dim"], depth=spec["depth"],
        heads=spec["heads"], dim_head=spec["dim_head"], nb_features=spec["nb_features"],
        rotary_position_emb=False,  # scBERT: a learned absolute (gene) embedding
        qkv_bias=False, attn_out_bias=True,  # scBERT's vendored copy has the output bias
    )
    model.to_out = torch.nn.Identity()  # scBERT replaces the language-model output: the encodings remain
    return model


def build_ours(spec: dict, state_dict: dict) -> tuple[torch.nn.Module, list[str]]:
    from performer_pytorch import PerformerConfig, PerformerLM, convert_scbert_state_dict

    config = PerformerConfig(
        num_tokens=spec["num_tokens"], max_seq_len=spec["seq_len"], dim=spec["dim"], depth=spec["depth"],
        heads=spec["heads"], dim_head=spec["dim_head"], nb_features=spec["nb_features"],
    )
    model = PerformerLM(config)
    encoder_state, leftover = convert_scbert_state_dict(state_dict)
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)
    problems = [k for k in missing if not k.endswith("num_redraws")] + list(unexpected) + list(leftover)
    if problems:
        raise SystemExit(f"reference weights do not map onto our encoder: {problems[:5]}")
    return model, missing


def time_model(model: torch.nn.Module, tokens: torch.Tensor, spec: dict) -> dict:
    """Forward (eval, no_grad) and forward+backward (train mode, backward of the output's sum)."""

    def forward() -> None:
        with torch.no_grad():
            model(tokens)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens).sum().backward()

    model.eval()
    fwd = time_call(forward, warmup=spec["warmup"], repeats=spec["repeats"])
    model.train()
    fwd_bwd = time_call(forward_backward, warmup=spec["warmup"], repeats=spec["repeats"])
    model.eval()
    return {"forward": fwd, "forward_backward": fwd_bwd}


def main(impl: str, spec: dict) -> None:
    set_threads(spec["threads"])
    import performer_pytorch

    location = str(Path(performer_pytorch.__file__).resolve())
    is_reference = "site-packages" in location
    if is_reference != impl.startswith("reference"):
        raise SystemExit(f"{impl}: imported the wrong performer_pytorch ({location}); check PYTHONPATH")
    weights = Path(spec["weights_path"])
    result: dict = {"impl": impl, "performer_pytorch": location, "threads": torch.get_num_threads()}
    if impl == "reference-init":
        torch.manual_seed(spec["seed"])
        model = build_reference(spec).eval()
        tokens = torch.randint(0, spec["num_tokens"], (spec["batch"], spec["seq_len"]))  # (batch, genes+1)
        with torch.no_grad():
            encodings = model(tokens)  # (batch, genes+1, dim)
        torch.save({"state_dict": model.state_dict(), "tokens": tokens, "encodings": encodings}, weights)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        emit_worker_result(result)
        return
    saved = torch.load(weights, weights_only=True)
    if impl == "reference":
        model = build_reference(spec)
        model.load_state_dict(saved["state_dict"])
    else:
        model, _ = build_ours(spec, saved["state_dict"])
        if spec.get("check"):
            model.eval()
            with torch.no_grad():
                ours = model(saved["tokens"])
            difference = (ours - saved["encodings"]).abs()
            result["max_abs_diff"] = float(difference.max())
            result["mean_abs_diff"] = float(difference.mean())
            result["encoding_abs_max"] = float(saved["encodings"].abs().max())
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["timing"] = time_model(model, saved["tokens"], spec)
    emit_worker_result(result)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
