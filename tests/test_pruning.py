"""Structured pruning of fc1/fc2: physical pruning is mask pruning made smaller, with the expected counts and stats."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import prune as torch_prune

from bayesian_sparse_transformer import BayesianLinear, BayesianSparseTransformer, HeadConfig, ModelConfig
from performer_pytorch import PerformerConfig

SEQ_LEN, DIM, HIDDEN1, HIDDEN2, CLASSES = 20, 16, 12, 8, 3


def tiny_model(*, bayes: bool, seed: int = 0) -> BayesianSparseTransformer:
    torch.manual_seed(seed)
    encoder = PerformerConfig(num_tokens=7, max_seq_len=SEQ_LEN, dim=DIM, depth=1, heads=2, dim_head=8, nb_features=16)
    head = HeadConfig(
        seq_len=SEQ_LEN, dim=DIM, num_classes=CLASSES, hidden1=HIDDEN1, hidden2=HIDDEN2, bayes=bayes, init_log_sigma=-2.0
    )
    return BayesianSparseTransformer(ModelConfig(encoder=encoder, head=head)).eval()


def random_tokens(batch: int = 6) -> torch.Tensor:
    return torch.randint(0, 7, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(0))  # (batch, genes+1)


def kept(amount: float, width: int) -> int:
    return width - round(amount * width)


def head_param_count(fc1_in: int, hidden1: int, hidden2: int, *, bayes: bool) -> int:
    """By hand: conv1 (dim weights + 1 bias), fc1 and fc2 (x2 when Bayesian: mean and log-sigma), fc3."""
    copies = 2 if bayes else 1
    fc1 = copies * (hidden1 * fc1_in + hidden1)
    fc2 = copies * (hidden2 * hidden1 + hidden2)
    fc3 = CLASSES * hidden2 + CLASSES
    return DIM + 1 + fc1 + fc2 + fc3


def physical_noise(masked: BayesianSparseTransformer, noise: dict) -> dict:
    """The masked model's noise restricted to the rows/columns the physically pruned model kept."""
    sliced = {}
    for name, draws in noise.items():
        layer = getattr(masked.head, name)
        rows, cols = layer.out_mask.nonzero().squeeze(1), layer.in_mask.nonzero().squeeze(1)
        sliced[name] = {"weight": draws["weight"][:, rows][:, :, cols], "bias": draws["bias"][:, rows]}
    return sliced


@pytest.mark.parametrize("bayes", [False, True], ids=["deterministic", "bayesian"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("amounts", [(0.3,), (0.1, 0.3)], ids=["single", "progressive"])
def test_physical_pruning_matches_masked_outputs(bayes, dim, amounts):
    physical = tiny_model(bayes=bayes)
    masked = copy.deepcopy(physical)
    for amount in amounts:
        physical_stats = physical.prune(amount, dim=dim, mode="physical")
        masked_stats = masked.prune(amount, dim=dim, mode="mask")
    tokens = random_tokens()
    physical.set_deterministic(True)
    masked.set_deterministic(True)
    with torch.no_grad():
        torch.testing.assert_close(physical(tokens), masked(tokens), atol=1e-5, rtol=1e-5)
    for name in ("fc1", "fc2"):
        assert physical_stats["layers"][name]["active_rows"] == masked_stats["layers"][name]["active_rows"]
        assert physical_stats["layers"][name]["active_cols"] == masked_stats["layers"][name]["active_cols"]
    assert physical_stats["fc12_sparsity"] == pytest.approx(masked_stats["fc12_sparsity"])

    if bayes:  # the same sampled networks, too: the masked model's draws restricted to what physical kept
        physical.set_deterministic(False)
        masked.set_deterministic(False)
        noise = masked.head.draw_noise(3, torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(
                physical.mc_logits(tokens, 3, noise=physical_noise(masked, noise)),
                masked.mc_logits(tokens, 3, noise=noise),
                atol=1e-5, rtol=1e-5,
            )


@pytest.mark.parametrize("bayes", [False, True], ids=["deterministic", "bayesian"])
@pytest.mark.parametrize("dim", [0, 1])
def test_physical_pruning_removes_exactly_the_pruned_parameters(bayes, dim):
    model = tiny_model(bayes=bayes)
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert sum(p.numel() for p in model.head.parameters()) == head_param_count(SEQ_LEN, HIDDEN1, HIDDEN2, bayes=bayes)
    amount = 0.25
    stats = model.prune(amount, dim=dim, mode="physical")
    if dim == 0:  # fc1 rows -> hidden1, fc2 rows -> hidden2
        widths = (SEQ_LEN, kept(amount, HIDDEN1), kept(amount, HIDDEN2))
    else:  # fc1 columns -> gene positions, fc2 columns -> hidden1
        widths = (kept(amount, SEQ_LEN), kept(amount, HIDDEN1), HIDDEN2)
    expected_head = head_param_count(*widths, bayes=bayes)
    assert stats["head_params"] == expected_head
    assert stats["total_params"] == encoder_params + expected_head
    assert stats["nonzero_params"] == stats["total_params"]
    assert model.head.fc1.mean_weight().shape == (widths[1], widths[0])
    assert model.head.fc2.mean_weight().shape == (widths[2], widths[1])
    assert model.head.fc3.weight.shape == (CLASSES, widths[2])
    c = model.config.head
    assert (c.fc1_in, c.hidden1, c.hidden2) == widths
    assert (c.base_hidden1, c.base_hidden2) == (HIDDEN1, HIDDEN2)
    if dim == 1:
        assert model.head.input_index is not None and len(model.head.input_index) == widths[0]


@pytest.mark.parametrize("layer_name", ["fc1", "fc2"])
@pytest.mark.parametrize("dim", [0, 1])
def test_mask_equals_torch_ln_structured_mask(layer_name, dim):
    model = tiny_model(bayes=True)
    layer = getattr(model.head, layer_name)
    reference = torch.nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        reference.weight.copy_(layer.mean_weight())
    amount = 0.3
    count = round(amount * reference.weight.shape[dim])
    torch_prune.ln_structured(reference, "weight", amount=count, n=2, dim=dim)
    model.prune(amount, layers=(layer_name,), dim=dim, mode="mask")
    assert torch.equal(layer.weight_mask(), reference.weight_mask)
    assert int((layer.weight_mask().sum(dim=1 - dim) == 0).sum()) == count


def test_mask_pruning_silences_the_next_layer_inputs():
    model = tiny_model(bayes=True)
    model.prune(0.25, layers=("fc1",), dim=0, mode="mask")
    removed = model.head.fc1.out_mask == 0
    assert int(removed.sum()) == 3
    assert torch.equal(model.head.fc2.in_mask, model.head.fc1.out_mask)
    assert not model.head.fc2.mean_weight()[:, removed].any()


def test_pruning_stats_report_structured_sparsity():
    model = tiny_model(bayes=True)
    stats = model.prune(0.25, dim=0, mode="mask")
    h1, h2 = kept(0.25, HIDDEN1), kept(0.25, HIDDEN2)  # 9, 6
    fc1, fc2 = stats["layers"]["fc1"], stats["layers"]["fc2"]
    assert (fc1["active_rows"], fc1["active_cols"]) == (h1, SEQ_LEN)
    assert (fc2["active_rows"], fc2["active_cols"]) == (h2, h1)
    assert fc1["row_sparsity"] == pytest.approx(0.25) and fc1["col_sparsity"] == 0
    assert fc2["row_sparsity"] == pytest.approx(0.25) and fc2["col_sparsity"] == pytest.approx(0.25)
    base = HIDDEN1 * SEQ_LEN + HIDDEN2 * HIDDEN1
    assert stats["fc12_base_weights"] == base
    assert stats["fc12_active_weights"] == h1 * SEQ_LEN + h2 * h1
    assert stats["fc12_sparsity"] == pytest.approx(1 - (h1 * SEQ_LEN + h2 * h1) / base)
    assert stats["total_params"] == sum(p.numel() for p in model.parameters())  # masks keep every parameter
    removed = 2 * ((HIDDEN1 - h1) * (SEQ_LEN + 1) + (HIDDEN2 * HIDDEN1 + HIDDEN2) - (h2 * h1 + h2))
    removed += (HIDDEN2 - h2) * CLASSES  # fc3 inputs of silenced fc2 neurons
    assert stats["nonzero_params"] == stats["total_params"] - removed
    physical = tiny_model(bayes=True)  # same seed, same weights: pruning keeps the same neurons
    assert physical.prune(0.25, dim=0, mode="physical")["total_params"] == stats["nonzero_params"]
    kept_positions = stats.pop("kept")  # what this call kept, on top of the model's lasting stats
    assert [len(kept_positions[unit]) for unit in ("hidden1", "hidden2")] == [h1, h2]
    assert model.pruning_stats() == stats


def test_pruning_nothing_changes_nothing():
    model = tiny_model(bayes=True)
    before = copy.deepcopy(model.state_dict())
    stats = model.prune(0.0, dim=0)
    assert stats["fc12_sparsity"] == 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_physical_prune_after_mask_prune_drops_the_masked_slices():
    masked_then_physical = tiny_model(bayes=False)
    masked_only = copy.deepcopy(masked_then_physical)
    masked_then_physical.prune(0.25, dim=0, mode="mask")
    masked_then_physical.prune(0.25, dim=0, mode="physical")
    masked_only.prune(0.25, dim=0, mode="mask")
    assert masked_then_physical.head.fc1.mean_weight().shape == (kept(0.25, HIDDEN1), SEQ_LEN)
    tokens = random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(masked_then_physical(tokens), masked_only(tokens), atol=1e-5, rtol=1e-5)


def test_physically_pruned_bayesian_layers_keep_their_sigmas():
    model = tiny_model(bayes=True)
    with torch.no_grad():
        model.head.fc1.weight_log_sigma.normal_(-2.0, 0.5)
    fc1 = model.head.fc1
    model.prune(0.25, layers=("fc1",), dim=0, mode="physical")
    new = model.head.fc1
    assert isinstance(new, BayesianLinear) and new.prior_sigma == fc1.prior_sigma
    norms = fc1.weight_mu.norm(dim=1)
    rows = norms.topk(new.out_features).indices.sort().values
    assert torch.equal(new.weight_log_sigma, fc1.weight_log_sigma[rows])
    assert torch.equal(new.weight_mu, fc1.weight_mu[rows])


def test_snr_scoring_removes_the_neurons_with_the_lowest_signal_to_noise():
    """Rows with large means but wide posteriors go first under snr, last under l2."""
    model = tiny_model(bayes=True)
    fc1 = model.head.fc1
    rng = torch.Generator().manual_seed(1)
    magnitude = torch.rand(HIDDEN1, 1, generator=rng) + 0.5  # (rows, 1): each row's |mu|
    sigma = magnitude * (torch.rand(HIDDEN1, 1, generator=rng) + 0.1)  # wider posteriors on larger rows, in random ratios
    with torch.no_grad():
        fc1.weight_mu.copy_(magnitude * torch.sign(torch.randn(fc1.weight_mu.shape, generator=rng)))
        fc1.weight_log_sigma.copy_(sigma.log().expand_as(fc1.weight_log_sigma))
    snr = (magnitude / sigma).squeeze(1)
    by_snr, by_l2 = copy.deepcopy(model), copy.deepcopy(model)
    by_snr.prune(0.5, layers=("fc1",), score="snr", mode="mask")
    by_l2.prune(0.5, layers=("fc1",), score="l2", mode="mask")
    keep = kept(0.5, HIDDEN1)
    expected = torch.zeros(HIDDEN1)
    expected[snr.topk(keep).indices] = 1.0
    assert torch.equal(by_snr.head.fc1.out_mask, expected)
    assert not torch.equal(by_l2.head.fc1.out_mask, expected)  # the two scores disagree on this layer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(amount=0.2, score="random"), "score"),
        (dict(amount=0.2, score="snr"), "Bayesian head"),
        (dict(amount=1.0), "amount"),
        (dict(amount=-0.1), "amount"),
        (dict(amount=0.2, dim=2), "dim"),
        (dict(amount=0.2, layers=("fc3",)), "can only prune"),
        (dict(amount=0.2, mode="magic"), "mode"),
    ],
)
def test_invalid_prune_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(bayes=False).prune(**kwargs)


@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_penalty_is_the_sum_of_slice_norms_and_shrinks_each_slice_toward_zero(dim):
    """The penalty's gradient on a slice is that slice's unit vector: it shrinks whole neurons, not single weights."""
    model = tiny_model(bayes=True)
    penalty = model.group_norm(("fc1", "fc2"), dim=dim)
    by_hand = sum(getattr(model.head, n).weight_mu.norm(dim=1 - dim).sum() for n in ("fc1", "fc2"))
    torch.testing.assert_close(penalty, by_hand)
    penalty.backward()
    mu = model.head.fc2.weight_mu
    torch.testing.assert_close(mu.grad, mu.detach() / mu.detach().norm(dim=1 - dim, keepdim=True))


def encodings(model: BayesianSparseTransformer, batch: int = 40) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(random_tokens(batch))  # (cells, genes+1, dim)


@pytest.mark.parametrize("bayes", [False, True], ids=["deterministic", "bayesian"])
@pytest.mark.parametrize("dim", [0, 1])
def test_refitting_the_next_layer_keeps_what_it_computes_closer_and_physical_still_matches_masked(bayes, dim):
    model = tiny_model(bayes=bayes)
    encoded = encodings(model)
    features = model.head.gene_features(encoded)  # what prediction feeds fc1: the refit's cells
    model.set_deterministic(True)
    with torch.no_grad():
        before = model.head(encoded)
    errors = {}
    for refit in (False, True):
        pruned = {mode: copy.deepcopy(model) for mode in ("physical", "mask")}
        for mode, twin in pruned.items():
            twin.prune(0.5, dim=dim, mode=mode, refit_features=features if refit else None)
            twin.set_deterministic(True)
        with torch.no_grad():
            outputs = {mode: twin.head(encoded) for mode, twin in pruned.items()}
        torch.testing.assert_close(outputs["physical"], outputs["mask"], rtol=1e-4, atol=1e-5)
        errors[refit] = float((outputs["physical"] - before).pow(2).mean())
    assert errors[True] < 0.5 * errors[False]  # the refit makes up for much of what the removed neurons did


def test_refit_is_weighted_least_squares_on_the_kept_inputs_and_an_overwhelming_ridge_only_slices():
    model = tiny_model(bayes=True)
    features = model.head.gene_features(encodings(model, batch=200)).double()  # (cells, genes): more cells than genes
    fc1 = model.head.fc1
    target = features @ fc1.weight_mu.detach().double().T + fc1.bias_mu.detach().double()
    fitted, sliced, heavy = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    cell_weights = torch.rand(len(features), generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.2
    stats = fitted.prune(0.5, layers=("fc1",), dim=1, refit_features=features.float(), refit_weights=cell_weights,
                         refit_ridge=1e-9)
    keep = stats["kept"]["inputs"]
    design = torch.cat([features[:, keep], torch.ones(len(features), 1, dtype=torch.float64)], 1)
    root = cell_weights.sqrt()[:, None]  # weighted least squares = ordinary least squares on sqrt(w)-scaled rows
    solution = torch.linalg.lstsq(root * design, root * target).solution  # (kept + 1, hidden1)
    torch.testing.assert_close(fitted.head.fc1.weight_mu, solution[:-1].T.float(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fitted.head.fc1.bias_mu, solution[-1].float(), rtol=1e-3, atol=1e-4)
    sliced.prune(0.5, layers=("fc1",), dim=1)
    heavy.prune(0.5, layers=("fc1",), dim=1, refit_features=features.float(), refit_ridge=1e9)
    torch.testing.assert_close(heavy.head.fc1.weight_mu, sliced.head.fc1.weight_mu, rtol=1e-4, atol=1e-6)


def test_sliced_noise_gives_the_physically_pruned_head_the_masked_heads_draws():
    from bayesian_sparse_transformer import head_noise_for_widths, slice_head_noise, unit_widths

    physical = tiny_model(bayes=True)
    masked = copy.deepcopy(physical)
    widths = unit_widths(physical)
    noise = physical.head.draw_noise(4, torch.Generator().manual_seed(3))
    by_widths = head_noise_for_widths(widths, 4, seed=3)
    for name in noise:  # the same numbers as the unpruned head's own draw_noise
        assert all(torch.equal(noise[name][k], by_widths[name][k]) for k in ("weight", "bias"))
    positions = {unit: torch.arange(width) for unit, width in widths.items()}
    for amount, dim in ((0.25, 0), (0.5, 1)):
        stats = physical.prune(amount, dim=dim, mode="physical")
        masked.prune(amount, dim=dim, mode="mask")
        for unit, keep in stats["kept"].items():
            positions[unit] = positions[unit][keep]
    encoded = encodings(physical)
    with torch.no_grad():
        torch.testing.assert_close(physical.head(encoded, slice_head_noise(noise, positions)), masked.head(encoded, noise),
                                   rtol=1e-4, atol=1e-5)


def test_an_all_zero_draw_is_the_posterior_means():
    """The paired rule reads the posterior means' calls from an extra all-zero noise sample (one encoding)."""
    model = tiny_model(bayes=True)
    encoded = encodings(model)
    noise = model.head.draw_noise(3, torch.Generator().manual_seed(0))
    zero = {name: {k: torch.cat([v, torch.zeros_like(v[:1])]) for k, v in draws.items()} for name, draws in noise.items()}
    with torch.no_grad():
        sampled = model.head(encoded, zero)  # (4, cells, classes)
        model.set_deterministic(True)
        means = model.head(encoded)
    torch.testing.assert_close(sampled[-1], means)
    model.set_deterministic(False)
    with torch.no_grad():
        torch.testing.assert_close(sampled[:-1], model.head(encoded, noise))  # the other draws are untouched
