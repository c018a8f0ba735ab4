"""Run the reference performer-pytorch 1.1.4 PerformerLM and save its weights, inputs and encodings.

Usage: python tests/reference_performer.py OUT_PATH JSON_CONFIG. Run in a subprocess whose sys.path does not
start at the repository root, so that `import performer_pytorch` finds the installed reference, not ours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out_path: str, config_json: str) -> None:
    import performer_pytorch

    location = Path(performer_pytorch.__file__).resolve()
    if "site-packages" not in location.parts:
        raise SystemExit(f"imported {location}, not the installed reference performer-pytorch")

    config = json.loads(config_json)
    torch.manual_seed(config["seed"])
    model = performer_pytorch.PerformerLM(
        num_tokens=config["num_tokens"],
        max_seq_len=config["max_seq_len"],
        dim=config["dim"],
        depth=config["depth"],
        heads=config["heads"],
        dim_head=config["dim_head"],
        nb_features=config["nb_features"],
        local_attn_heads=config["local_attn_heads"],
        local_window_size=config["local_window_size"],
        rotary_position_emb=False,  # scBERT: learned (gene2vec-shaped) absolute position embedding
        qkv_bias=False,
        attn_out_bias=True,
    )
    model.to_out = torch.nn.Identity()  # scBERT replaces the language-model output; this leaves the encodings
    model.eval()
    tokens = torch.randint(0, config["num_tokens"], (config["batch"], config["max_seq_len"]))
    with torch.no_grad():
        encodings = model(tokens)  # (batch, genes+1, dim)
    torch.save(
        {"state_dict": model.state_dict(), "tokens": tokens, "encodings": encodings, "reference": str(location)},
        out_path,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
