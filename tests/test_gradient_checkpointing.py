"""Activation checkpointing and frozen leading blocks save memory without changing the loss or any gradient."""

from __future__ import annotations

import copy

import pytest
import torch

import finetune_sparse
import performer_pytorch.model as performer_model
from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig
from checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from performer_pytorch import PerformerConfig, PerformerLM

SEQ_LEN = 24


def tiny_encoder(dropout: float = 0.0, **overrides) -> PerformerLM:
    settings = dict(num_tokens=7, max_seq_len=SEQ_LEN, dim=16, depth=3, heads=2, dim_head=8, nb_features=16,
                    emb_dropout=dropout, ff_dropout=dropout, attn_dropout=dropout)
    torch.manual_seed(0)
    return PerformerLM(PerformerConfig(**{**settings, **overrides})).train()


def random_tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 7, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(1))  # (batch, genes+1)


def loss_and_gradients(model: PerformerLM, tokens: torch.Tensor, seed: int = 3) -> tuple[torch.Tensor, dict]:
    """One training step's loss and the gradient of every trainable parameter, dropout seeded alike."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    encodings = model(tokens)  # (batch, genes+1, dim)
    loss = (encodings * torch.linspace(-1, 1, encodings.shape[-1])).pow(2).mean()  # not just a sum: LayerNorm
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def saved_activation_bytes(model: PerformerLM, tokens: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward (what the memory holds)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens)
    return sum(storages.values())


def freeze_all_but_last_block(model: PerformerLM) -> None:
    """scBERT's fine-tuning recipe (finetune_sparse.freeze_encoder_layers): last block and final norm train."""
    model.requires_grad_(False)
    model.layers[-1].requires_grad_(True)
    model.norm.requires_grad_(True)


# ---- gradient checkpointing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(dropout, monkeypatch):
    # Redraw on every forward: the redraw must happen before the blocks, never inside a recomputation.
    plain = tiny_encoder(dropout, feature_redraw_interval=0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.config.gradient_checkpointing = True
    calls = []
    monkeypatch.setattr(performer_model, "checkpoint", lambda *a, **k: calls.append(k) or torch.utils.checkpoint.checkpoint(*a, **k))
    tokens = random_tokens()
    for step in range(2):
        loss, grads = loss_and_gradients(plain, tokens, seed=step)
        loss_ckpt, grads_ckpt = loss_and_gradients(checkpointed, tokens, seed=step)
        torch.testing.assert_close(loss_ckpt, loss)
        assert grads_ckpt.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(grads_ckpt[name], grads[name], msg=f"gradient of {name}")
    assert len(calls) == 2 * plain.config.depth and all(k == {"use_reentrant": False} for k in calls)
    assert int(checkpointed.num_redraws) == int(plain.num_redraws) == 2


def test_checkpointing_keeps_fewer_activations_and_is_off_in_eval_and_no_grad(monkeypatch):
    plain = tiny_encoder()
    checkpointed = copy.deepcopy(plain)
    checkpointed.config.gradient_checkpointing = True
    tokens = random_tokens()
    assert saved_activation_bytes(checkpointed, tokens) < saved_activation_bytes(plain, tokens) / 2
    monkeypatch.setattr(performer_model, "checkpoint", lambda *a, **k: pytest.fail("checkpointed outside training"))
    with torch.no_grad():
        checkpointed(tokens)
    checkpointed.eval()(tokens)


def test_a_redraw_between_checkpointed_forward_and_backward_raises():
    model = tiny_encoder(feature_redraw_interval=0)
    model.config.gradient_checkpointing = True
    tokens = random_tokens()
    first = model(tokens)
    model(tokens)  # redraws the projections the first forward's recomputation would need
    with pytest.raises(RuntimeError, match="redrawn between a checkpointed forward and its backward"):
        first.sum().backward()


# ---- frozen leading blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_frozen_leading_blocks_give_the_same_gradients_with_less_memory(gradient_checkpointing):
    reference = tiny_encoder(dropout=0.2, gradient_checkpointing=gradient_checkpointing)  # everything trainable
    frozen = copy.deepcopy(reference)
    freeze_all_but_last_block(frozen)
    tokens = random_tokens()
    loss, grads = loss_and_gradients(reference, tokens)
    loss_frozen, grads_frozen = loss_and_gradients(frozen, tokens)
    torch.testing.assert_close(loss_frozen, loss)
    assert set(grads_frozen) == {n for n, _ in frozen.named_parameters() if n.startswith(("layers.2.", "norm."))}
    for name, grad in grads_frozen.items():
        torch.testing.assert_close(grad, grads[name], msg=f"gradient of {name}")
    if not gradient_checkpointing:  # (checkpointed blocks hide what they save from the hooks that count it)
        assert saved_activation_bytes(frozen, tokens) < saved_activation_bytes(reference, tokens) / 2


def test_frozen_leading_blocks_record_no_graph_until_something_before_them_trains():
    model = tiny_encoder()
    freeze_all_but_last_block(model)
    outputs_need_grad = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, inputs, output: outputs_need_grad.append(output.requires_grad))
    model(random_tokens())
    assert outputs_need_grad == [False, False, True]
    outputs_need_grad.clear()
    model.token_emb.weight.requires_grad_(True)  # now the frozen blocks carry the embedding's gradient
    model(random_tokens())
    assert outputs_need_grad == [True, True, True]


# ---- configuration and the training script --------------------------------------------------------------------


def tiny_model() -> BayesianSparseTransformer:
    encoder = PerformerConfig(num_tokens=7, max_seq_len=SEQ_LEN, dim=16, depth=1, heads=2, dim_head=8, nb_features=16)
    head = HeadConfig(seq_len=SEQ_LEN, dim=16, num_classes=3, hidden2=8)
    return BayesianSparseTransformer(ModelConfig(encoder, head)).eval()


def test_a_checkpoint_saved_without_the_field_still_loads(tmp_path):
    model = tiny_model()
    path = tmp_path / "old.pth"
    save_checkpoint(path, model, genes=[f"G{i}" for i in range(SEQ_LEN - 1)], classes=["a", "b", "c"], bin_num=5,
                    stage="A")
    payload = torch.load(path, weights_only=True)
    del payload["model_config"]["encoder"]["gradient_checkpointing"]  # as written before the option existed
    torch.save(payload, path)
    loaded = load_checkpoint(path).model.eval()
    assert loaded.config.encoder.gradient_checkpointing is False
    tokens = random_tokens()
    torch.testing.assert_close(loaded(tokens), model(tokens))


@pytest.mark.parametrize("new_head", [False, True])
def test_build_model_applies_the_flag_to_a_continued_model_without_touching_the_source(new_head):
    source_model = tiny_model()
    checkpoint = Checkpoint(model=source_model, genes=[f"G{i}" for i in range(SEQ_LEN - 1)], classes=["a", "b", "c"],
                            bin_num=5, stage="A")
    config = finetune_sparse.default_config(gradient_checkpointing=True, h_dim=8, model_path="m.pth")
    model = finetune_sparse.build_model(config, finetune_sparse.Source(checkpoint, new_head=new_head), checkpoint.genes, 3)
    assert model.encoder.config.gradient_checkpointing is True
    assert model.config.encoder.gradient_checkpointing is True  # what the new checkpoint will record
    assert source_model.config.encoder.gradient_checkpointing is False
    assert finetune_sparse.build_parser().parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True
