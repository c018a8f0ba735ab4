"""Behaviour of the hand-written Performer: FAVOR+ accuracy, equality with performer-pytorch 1.1.4, redraws, options."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig
from checkpoints import load_gene_vectors, load_pretrained_encoder
from performer_pytorch import (
    FastAttention,
    PerformerConfig,
    PerformerLM,
    convert_scbert_state_dict,
    exact_softmax_attention,
    gaussian_orthogonal_random_matrix,
)
from performer_pytorch.model import FeedForward
from utils import UserError

REFERENCE_SCRIPT = Path(__file__).with_name("reference_performer.py")


def tiny_config(**overrides) -> PerformerConfig:
    settings = dict(num_tokens=7, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8, nb_features=16)
    return PerformerConfig(**{**settings, **overrides})


def random_tokens(config: PerformerConfig, batch: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.num_tokens, (batch, config.max_seq_len), generator=generator)  # (batch, genes+1)


def projections(model: PerformerLM) -> list[torch.Tensor]:
    return [attention.projection_matrix.clone() for attention in model.fast_attentions()]


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---- FAVOR+ kernel ------------------------------------------------------------------------------------------


def test_favor_error_falls_as_random_features_grow():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=generator) for _ in range(3))  # (b, h, n, d)
    q, k = q * 0.5, k * 0.5
    exact = exact_softmax_attention(q, k, v)
    mean_error = {}
    for nb_features in (16, 64, 256):
        attention = FastAttention(16, nb_features)
        errors = []
        for seed in range(8):  # average over projection draws so one lucky draw cannot decide
            attention.redraw(torch.Generator().manual_seed(seed))
            errors.append(((attention(q, k, v) - exact).norm() / exact.norm()).item())
        mean_error[nb_features] = float(np.mean(errors))
    assert mean_error[16] > mean_error[64] > mean_error[256]
    assert mean_error[256] < 0.5 * mean_error[16]
    assert mean_error[256] < 0.25


def test_generalized_attention_outputs_are_convex_combinations_of_values():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 32, 8, generator=generator) for _ in range(3))
    out = FastAttention(8, 32, generalized_attention=True)(q, k, v)  # (b, h, n, d)
    assert out.shape == v.shape and torch.isfinite(out).all()
    low, high = v.amin(dim=-2, keepdim=True), v.amax(dim=-2, keepdim=True)  # per (b, h, column)
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()


@pytest.mark.parametrize("nb_rows", [16, 40])
def test_orthogonal_random_matrix_rows_are_orthogonal_within_blocks(nb_rows):
    d = 16
    generator = torch.Generator().manual_seed(0)
    matrix = gaussian_orthogonal_random_matrix(nb_rows, d, generator=generator).double()
    assert matrix.shape == (nb_rows, d)
    for start in range(0, nb_rows, d):
        block = matrix[start : start + d]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-4 * gram.diagonal().max()
    scaled = gaussian_orthogonal_random_matrix(nb_rows, d, scaling=1, generator=generator)
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((nb_rows,), d**0.5))
    with pytest.raises(ValueError, match="scaling"):
        gaussian_orthogonal_random_matrix(nb_rows, d, scaling=2)


# ---- equality with the reference performer-pytorch 1.1.4 -----------------------------------------------------


def run_reference(tmp_path: Path, config: dict) -> dict:
    """Run tests/reference_performer.py in a clean interpreter so it imports the installed reference package."""
    out_path = tmp_path / "reference.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # keep our package off its path
    result = subprocess.run(
        [sys.executable, str(REFERENCE_SCRIPT), str(out_path), json.dumps(config)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return torch.load(out_path, weights_only=True)


@pytest.mark.parametrize(
    ("heads", "local_attn_heads"), [(2, 0), (4, 2)], ids=["global-heads", "local-heads"]
)
def test_encodings_match_reference_performer_loaded_as_scbert(tmp_path, heads, local_attn_heads):
    config = dict(
        num_tokens=7, max_seq_len=64, dim=32, depth=2, heads=heads, dim_head=8, nb_features=16,
        local_attn_heads=local_attn_heads, local_window_size=16, batch=3, seed=0,
    )
    reference = run_reference(tmp_path, config)
    assert "site-packages" in reference["reference"]
    checkpoint = tmp_path / "scbert_pretrained.pth"
    torch.save({"model_state_dict": reference["state_dict"]}, checkpoint)  # the layout scBERT saves

    encoder = PerformerConfig(
        num_tokens=7, max_seq_len=64, dim=32, depth=2, heads=heads, dim_head=8, nb_features=16,
        local_attn_heads=local_attn_heads, local_window_size=16,
    )
    model = BayesianSparseTransformer(
        ModelConfig(encoder=encoder, head=HeadConfig(seq_len=64, dim=32, num_classes=3, hidden1=8, hidden2=4))
    )
    notes = load_pretrained_encoder(model, checkpoint)
    assert any("encoder tensors" in note for note in notes)
    model.eval()
    with torch.no_grad():
        ours = model.encode(reference["tokens"])
    torch.testing.assert_close(ours, reference["encodings"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("local_attn_heads", [0, 1], ids=["global-heads", "local-heads"])
def test_encodings_do_not_depend_on_batch_companions(local_attn_heads):
    config = tiny_config(local_attn_heads=local_attn_heads, local_window_size=8)
    torch.manual_seed(0)
    model = PerformerLM(config).eval()
    tokens = random_tokens(config, batch=4)
    with torch.no_grad():
        batched = model(tokens)
        alone = torch.cat([model(tokens[i : i + 1]) for i in range(len(tokens))])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


# ---- projection redraws -------------------------------------------------------------------------------------


def test_projections_redraw_after_interval_in_training_only():
    config = tiny_config(feature_redraw_interval=3)
    model = PerformerLM(config).train()
    tokens = random_tokens(config, batch=1)
    initial = projections(model)
    for _ in range(3):  # the counter reaches the interval; the redraw happens at the start of the next call
        model(tokens)
        assert same_tensors(projections(model), initial)
    model(tokens)
    redrawn = projections(model)
    assert not any(torch.equal(a, b) for a, b in zip(redrawn, initial, strict=True))
    assert not torch.equal(redrawn[0], redrawn[1])  # each layer draws its own features
    model.eval()
    for _ in range(10):
        model(tokens)
    assert same_tensors(projections(model), redrawn)


def test_fix_projections_stops_redraws():
    config = tiny_config(feature_redraw_interval=1)
    model = PerformerLM(config).train()
    model.fix_projections()
    initial = projections(model)
    for _ in range(5):
        model(random_tokens(config, batch=1))
    assert same_tensors(projections(model), initial)


def test_redraws_follow_model_state_not_global_rng():
    """Two replicas (DDP ranks, or a resumed run) with the same state draw the same features."""
    config = tiny_config(feature_redraw_interval=2)
    tokens = random_tokens(config, batch=1)
    first = PerformerLM(config).train()
    for _ in range(4):  # one redraw in, mid-way to the next
        first(tokens)
    second = PerformerLM(config).train()
    second.load_state_dict(first.state_dict())
    for step in range(6):
        torch.manual_seed(100 + step)  # the ranks' global RNGs disagree
        first(tokens)
        torch.manual_seed(200 + step)
        second(tokens)
        assert same_tensors(projections(first), projections(second))
    assert int(first.num_redraws) == 3


# ---- options --------------------------------------------------------------------------------------------------


def test_chunked_feed_forward_matches_unchunked():
    torch.manual_seed(0)
    plain = PerformerLM(tiny_config(ff_chunks=1)).eval()
    chunked = PerformerLM(tiny_config(ff_chunks=4)).eval()
    chunked.load_state_dict(plain.state_dict())
    tokens = random_tokens(plain.config)
    with torch.no_grad():
        torch.testing.assert_close(chunked(tokens), plain(tokens), atol=1e-6, rtol=1e-6)


def test_glu_feed_forward_gates_the_activation():
    torch.manual_seed(0)
    ff = FeedForward(dim=8, mult=2, glu=True)
    assert ff.w1.out_features == 2 * 2 * 8
    x = torch.randn(2, 5, 8)
    hidden, gate = ff.w1(x).chunk(2, dim=-1)
    torch.testing.assert_close(ff(x), ff.w2(torch.nn.functional.gelu(hidden) * gate))
    model = PerformerLM(tiny_config(ff_glu=True)).eval()
    out = model(random_tokens(model.config))
    assert out.shape == (3, 32, 16) and torch.isfinite(out).all()


def test_without_gene_embedding_the_encoder_is_permutation_equivariant():
    torch.manual_seed(0)
    model = PerformerLM(tiny_config(gene_embedding="none")).eval()
    assert model.gene_emb is None
    tokens = random_tokens(model.config, batch=2)
    order = torch.randperm(tokens.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, order]), model(tokens)[:, order], atol=1e-5, rtol=1e-5)


def test_gene2vec_embedding_is_frozen_and_used():
    config = tiny_config(gene_embedding="gene2vec", depth=1)
    vectors = torch.randn(config.max_seq_len, config.dim)
    model = PerformerLM(config, gene_vectors=vectors)
    assert torch.equal(model.gene_emb.weight, vectors)
    assert not model.gene_emb.weight.requires_grad
    model(random_tokens(config)).sum().backward()
    assert model.gene_emb.weight.grad is None and model.token_emb.weight.grad is not None
    rebuilt = PerformerLM(config)  # without vectors: filled from the state dict
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.gene_emb.weight, vectors)
    with pytest.raises(ValueError, match="gene vectors have shape"):
        PerformerLM(config, gene_vectors=torch.zeros(3, config.dim))


def test_invalid_performer_config_is_rejected():
    with pytest.raises(ValueError, match="gene_embedding"):
        tiny_config(gene_embedding="onehot")
    with pytest.raises(ValueError, match="depth"):
        tiny_config(depth=0)


# ---- gene2vec files -------------------------------------------------------------------------------------------


def test_load_gene_vectors_aligns_text_by_symbol_and_warns_about_missing(tmp_path):
    path = tmp_path / "gene2vec.txt"
    path.write_text("3 2\nCD3E 1 2\nMS4A1 3 4\nNOTINDATA 5 6\n")
    with pytest.warns(UserWarning, match="1 of 3 genes"):
        table = load_gene_vectors(path, ["MS4A1", "LYZ", "CD3E"], dim=2)
    expected = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])  # last row: the appended token
    assert torch.equal(table, expected)
    with pytest.raises(UserError, match="no gene of the data"):
        load_gene_vectors(path, ["LYZ"], dim=2)
    with pytest.raises(UserError, match="expected 3"):
        load_gene_vectors(path, ["CD3E"], dim=3)


def test_load_gene_vectors_reads_npy_in_gene_order(tmp_path):
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.save(tmp_path / "vectors.npy", vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = load_gene_vectors(tmp_path / "vectors.npy", ["A", "B", "C"], dim=2)
    assert table.shape == (4, 2)
    assert np.array_equal(table[:3].numpy(), vectors) and not table[3].any()
    with pytest.raises(UserError, match="has shape"):
        load_gene_vectors(tmp_path / "vectors.npy", ["A"], dim=2)
    with pytest.raises(UserError, match="not found"):
        load_gene_vectors(tmp_path / "missing.npy", ["A"], dim=2)


# ---- scBERT state dicts -----------------------------------------------------------------------------------------


def to_scbert_keys(model: PerformerLM, *, extra_fn: bool, ddp: bool) -> dict[str, torch.Tensor]:
    """Our encoder's state dict renamed the way scBERT / performer-pytorch save it (q, k, v split apart)."""
    attn_fn = "fn.fn." if extra_fn else "fn."
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers":
            i, module, rest = parts[1], parts[2], ".".join(parts[3:])
            block = f"performer.net.layers.{i}"
            if module == "attn_norm":
                out[f"{block}.0.norm.{rest}"] = value
            elif module == "ff_norm":
                out[f"{block}.1.norm.{rest}"] = value
            elif module == "ff":
                out[f"{block}.1.fn.fn.{rest}"] = value
            elif rest.startswith("to_qkv."):
                param = rest.split(".")[1]
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3), strict=True):
                    out[f"{block}.0.{attn_fn}{name}.{param}"] = part
            else:
                out[f"{block}.0.{attn_fn}{rest}"] = value
        elif parts[0] == "gene_emb":
            out["pos_emb.emb.weight"] = value
        elif key == "calls_since_redraw":
            out["performer.proj_updater.calls_since_last_redraw"] = value
        elif key != "num_redraws":
            out[key] = value
    if ddp:
        out = {f"module.{key}": value for key, value in out.items()}
    return out


@pytest.mark.parametrize("extra_fn", [False, True], ids=["fn", "fn.fn"])
@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "module-prefix"])
def test_convert_scbert_state_dict_restores_our_keys(extra_fn, ddp):
    torch.manual_seed(0)
    model = PerformerLM(tiny_config())
    scbert = to_scbert_keys(model, extra_fn=extra_fn, ddp=ddp)
    scbert["to_out.weight"] = torch.zeros(7, 16)  # the language-model output: not part of the encoder
    encoder, leftover = convert_scbert_state_dict(scbert)
    expected = {k: v for k, v in model.state_dict().items() if k != "num_redraws"}
    assert sorted(encoder) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(encoder[key], value), key
    assert list(leftover) == ["to_out.weight"]


def test_convert_scbert_state_dict_needs_all_of_q_k_v():
    scbert = to_scbert_keys(PerformerLM(tiny_config(depth=1)), extra_fn=False, ddp=False)
    del scbert["performer.net.layers.0.0.fn.to_v.weight"]
    with pytest.raises(KeyError, match="to_v"):
        convert_scbert_state_dict(scbert)


def test_pretrained_encoder_missing_value_projection_is_a_user_error(tmp_path):
    scbert = to_scbert_keys(PerformerLM(tiny_config()), extra_fn=False, ddp=False)
    del scbert["performer.net.layers.1.0.fn.to_v.weight"]
    path = tmp_path / "damaged.pth"
    torch.save({"model_state_dict": scbert}, path)
    with pytest.raises(UserError, match="to_v"):
        load_pretrained_encoder(tiny_classifier(tiny_config()), path)


def tiny_classifier(config: PerformerConfig) -> BayesianSparseTransformer:
    head = HeadConfig(seq_len=config.max_seq_len, dim=config.dim, num_classes=3, hidden1=8, hidden2=4)
    return BayesianSparseTransformer(ModelConfig(encoder=copy.deepcopy(config), head=head)).eval()


def test_finetuned_scbert_head_is_loaded_with_the_encoder(tmp_path):
    torch.manual_seed(0)
    source = tiny_classifier(tiny_config())
    scbert = to_scbert_keys(source.encoder, extra_fn=True, ddp=True)
    for key, value in source.head.state_dict().items():
        if not key.endswith("_mask"):
            scbert[f"module.to_out.{key}"] = value  # scBERT's Identity head: to_out.{conv1,fc1,fc2,fc3}
    path = tmp_path / "finetuned.pth"
    torch.save({"model_state_dict": scbert}, path)
    torch.manual_seed(1)
    target = tiny_classifier(tiny_config())
    notes = load_pretrained_encoder(target, path)
    assert any("classifier head" in note for note in notes)
    tokens = random_tokens(source.config.encoder)
    with torch.no_grad():
        torch.testing.assert_close(target(tokens), source(tokens))


def test_pretrained_encoder_shape_mismatch_names_the_tensor(tmp_path):
    scbert = to_scbert_keys(PerformerLM(tiny_config(num_tokens=9)), extra_fn=False, ddp=False)
    path = tmp_path / "other_bins.pth"
    torch.save({"model_state_dict": scbert}, path)
    with pytest.raises(UserError, match=r"token_emb\.weight has shape \(9, 16\)"):
        load_pretrained_encoder(tiny_classifier(tiny_config()), path)


def test_pretrained_encoder_depth_mismatch_is_a_user_error(tmp_path):
    scbert = to_scbert_keys(PerformerLM(tiny_config(depth=1)), extra_fn=False, ddp=False)
    path = tmp_path / "shallow.pth"
    torch.save({"model_state_dict": scbert}, path)
    with pytest.raises(UserError, match="missing"):
        load_pretrained_encoder(tiny_classifier(tiny_config(depth=2)), path)


def _softmax_features_by_autograd(data, projection, is_query):
    """The textbook FAVOR+ positive features, differentiated by autograd (the reference for the custom backward)."""
    normalizer = data.shape[-1] ** -0.25
    exponent = (data * normalizer) @ projection.T
    half_sq_norm = (data**2).sum(-1, keepdim=True) * normalizer**2 / 2
    dims = (-1,) if is_query else (-2, -1)
    return torch.exp(exponent - half_sq_norm - exponent.amax(dim=dims, keepdim=True).detach())


@pytest.mark.parametrize("is_query", [True, False])
def test_softmax_kernel_custom_backward_matches_autograd(is_query):
    from performer_pytorch.kernels import softmax_kernel

    torch.manual_seed(0)
    data = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    projection = torch.randn(12, 8, dtype=torch.float64)
    upstream = torch.randn(2, 3, 7, 12, dtype=torch.float64)
    ours = softmax_kernel(data, projection, is_query=is_query)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), data)
    reference = _softmax_features_by_autograd(data, projection, is_query)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), data)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, grad_reference)


@pytest.mark.parametrize("tile_elements", [60, 1 << 23], ids=["many-tiles", "one-tile"])
def test_fused_favor_attention_matches_unfused_kernels_and_their_gradients(monkeypatch, tile_elements):
    from performer_pytorch import kernels

    monkeypatch.setattr(kernels, "FUSED_TILE_ELEMENTS", tile_elements)  # 60: tiles of 2 rows, 3 heads, 12 features
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 37, 3, 3, 8, dtype=torch.float64, generator=generator).requires_grad_()  # (b, n, 3, h, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided (b, h, n, d) views, as SelfAttention passes them
    projection = torch.randn(12, 8, dtype=torch.float64, generator=generator)
    upstream = torch.randn(2, 3, 37, 8, dtype=torch.float64, generator=generator)
    eps = kernels.SOFTMAX_FEATURE_EPS
    unfused = kernels.linear_attention(kernels.softmax_kernel(q, projection, is_query=True),
                                       kernels.softmax_kernel(k, projection, is_query=False), v, feature_eps=eps)
    (grad_unfused,) = torch.autograd.grad((unfused * upstream).sum(), qkv)
    fused = kernels.favor_softmax_attention(q, k, v, projection, eps)
    (grad_fused,) = torch.autograd.grad((fused * upstream).sum(), qkv)
    with torch.no_grad():
        fused_eval = kernels.favor_softmax_attention(q, k, v, projection, eps)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_eval, unfused, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_fused, grad_unfused, rtol=1e-10, atol=1e-12)
