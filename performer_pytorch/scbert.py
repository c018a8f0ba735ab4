"""Key mapping from scBERT / performer-pytorch 1.1.4 `PerformerLM` state dicts to this package's module tree.

scBERT vendored performer-pytorch: blocks live under `performer.net.layers.{i}.{0: attention, 1: feed-forward}`,
each wrapped in a PreLayerNorm (`.norm`, `.fn`) and possibly more `.fn` wrappers (Chunk, shift tokens), with
separate to_q/to_k/to_v projections. Here q, k and v share one fused `to_qkv` projection.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_BLOCK_KEY = re.compile(r"^performer\.net\.layers\.(\d+)\.([01])\.(.+)$")
_QKV = ("to_q", "to_k", "to_v")


def _strip_wrappers(rest: str) -> str:
    while rest.startswith("fn."):
        rest = rest[3:]
    return rest


def convert_scbert_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a scBERT-style state dict into (encoder state dict in our key names, keys not belonging to the encoder).

    The leftovers are scBERT's `to_out.*` (its MLM output layer, or its fine-tuned classifier head) and anything
    unknown; callers decide what to do with them.
    """
    encoder: dict[str, Tensor] = {}
    leftover: dict[str, Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key.startswith("performer.proj_updater.instance."):
            continue  # the same tensors again, registered a second time by the reference's redraw helper
        if key.startswith(("token_emb.", "norm.")):
            encoder[key] = value
        elif key == "pos_emb.emb.weight":
            encoder["gene_emb.weight"] = value
        elif key == "performer.proj_updater.calls_since_last_redraw":
            encoder["calls_since_redraw"] = value
        elif match := _BLOCK_KEY.match(key):
            layer, sub, rest = int(match[1]), match[2], match[3]
            prefix = f"layers.{layer}."
            if rest.startswith("norm."):
                encoder[prefix + ("attn_norm." if sub == "0" else "ff_norm.") + rest[5:]] = value
                continue
            rest = _strip_wrappers(rest)
            if sub == "1":
                encoder[prefix + "ff." + rest] = value
            elif rest.split(".")[0] in _QKV:
                name, param = rest.split(".", 1)
                qkv_parts.setdefault((layer, param), {})[name] = value
            else:
                encoder[prefix + "attn." + rest] = value
        else:
            leftover[key] = value
    for (layer, param), parts in qkv_parts.items():
        if set(parts) != set(_QKV):
            raise KeyError(f"layer {layer}: found {sorted(parts)} {param} but need all of to_q, to_k, to_v")
        encoder[f"layers.{layer}.attn.to_qkv.{param}"] = torch.cat([parts[name] for name in _QKV], dim=0)
    return encoder, leftover


def is_scbert_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """True when the keys look like scBERT's / performer-pytorch's PerformerLM."""
    return any(_BLOCK_KEY.match(key.removeprefix("module.")) for key in state_dict)
