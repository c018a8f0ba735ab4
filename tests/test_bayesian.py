"""Behaviour of BayesianLinear and of the model's Monte Carlo prediction (head-only sampling, Stage A -> B port)."""

from __future__ import annotations

import math

import pytest
import torch

from bayesian_sparse_transformer import (
    LOG_SIGMA_RANGE,
    BayesianLinear,
    BayesianSparseTransformer,
    HeadConfig,
    ModelConfig,
    predict_samples,
)
from performer_pytorch import PerformerConfig


def bayesian_layer(in_features: int = 4, out_features: int = 3, *, log_sigma: float = -1.5, seed: int = 0, **kwargs):
    """A layer with random means and non-trivial sigmas, so mistakes in either show up."""
    torch.manual_seed(seed)
    layer = BayesianLinear(in_features, out_features, prior_sigma=0.2, **kwargs)
    with torch.no_grad():
        layer.weight_mu.normal_(0, 0.3)
        layer.bias_mu.normal_(0, 0.3)
        layer.weight_log_sigma.uniform_(log_sigma - 0.5, log_sigma + 0.5)
        layer.bias_log_sigma.uniform_(log_sigma - 0.5, log_sigma + 0.5)
    return layer


def tiny_model(*, bayes: bool, seq_len: int = 16, seed: int = 0) -> BayesianSparseTransformer:
    torch.manual_seed(seed)
    encoder = PerformerConfig(num_tokens=7, max_seq_len=seq_len, dim=16, depth=1, heads=2, dim_head=8, nb_features=16)
    head = HeadConfig(seq_len=seq_len, dim=16, num_classes=3, hidden1=12, hidden2=8, bayes=bayes, init_log_sigma=-1.0)
    return BayesianSparseTransformer(ModelConfig(encoder=encoder, head=head)).eval()


def random_tokens(batch: int = 5, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 7, (batch, seq_len), generator=torch.Generator().manual_seed(seed))  # (batch, genes+1)


# ---- BayesianLinear ------------------------------------------------------------------------------------------


def test_closed_form_kl_matches_monte_carlo_estimate():
    layer = bayesian_layer()
    prior = torch.distributions.Normal(0.0, layer.prior_sigma)
    draws = 20000
    generator = torch.Generator().manual_seed(0)
    mc = torch.zeros(())
    for mu, sigma in ((layer.weight_mu, layer.weight_sigma()), (layer.bias_mu, layer.bias_sigma())):
        posterior = torch.distributions.Normal(mu.detach().double(), sigma.detach().double())
        sample = posterior.mean + posterior.stddev * torch.randn((draws, *mu.shape), generator=generator, dtype=torch.double)
        mc = mc + (posterior.log_prob(sample) - prior.log_prob(sample)).sum(dim=tuple(range(1, sample.dim()))).mean()
    closed = layer.kl_divergence().item()
    assert closed > 0
    assert closed == pytest.approx(mc.item(), rel=0.03)


def test_samples_differ_but_deterministic_mode_returns_the_mean():
    layer = bayesian_layer()
    x = torch.randn(6, 4)
    assert not torch.allclose(layer(x), layer(x))
    layer.deterministic = True
    expected = torch.nn.functional.linear(x, layer.weight_mu, layer.bias_mu)
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("local_reparam", [False, True], ids=["weight-sampling", "local-reparam"])
def test_gradients_reach_means_and_log_sigmas(local_reparam):
    layer = bayesian_layer(local_reparam=local_reparam)
    (layer(torch.randn(6, 4)) ** 2).sum().backward()  # the data term alone must train the sigmas too
    for name in ("weight_mu", "weight_log_sigma", "bias_mu", "bias_log_sigma"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_local_reparameterization_matches_weight_sampling_moments():
    layer = bayesian_layer(log_sigma=-1.0)
    x = torch.randn(2, 4)
    draws = 20000
    mean = torch.nn.functional.linear(x, layer.weight_mu, layer.bias_mu).detach()  # (2, 3)
    var = torch.nn.functional.linear(x**2, layer.weight_sigma() ** 2, layer.bias_sigma() ** 2).detach()
    with torch.no_grad():
        torch.manual_seed(0)
        weight_sampled = layer(x, layer.draw_noise(draws))  # (draws, 2, 3)
        layer.local_reparam = True
        local = layer(x.expand(draws, 2, 4))  # (draws, 2, 3), noise on the pre-activations
    for samples in (weight_sampled, local):
        torch.testing.assert_close(samples.mean(0), mean, atol=4 * (var / draws).sqrt().max().item(), rtol=0)
        torch.testing.assert_close(samples.var(0), var, rtol=0.05, atol=0)


def test_masked_weights_contribute_no_kl():
    layer = bayesian_layer()
    with torch.no_grad():
        layer.out_mask[1] = 0
        layer.in_mask[[0, 2]] = 0
    before = layer.kl_divergence()
    with torch.no_grad():  # what happens under the mask must not matter
        layer.weight_mu[1] = 5.0
        layer.weight_mu[:, 0] = -5.0
        layer.bias_mu[1] = 5.0
        layer.weight_log_sigma[:, 2] = -9.0
    assert layer.kl_divergence().item() == pytest.approx(before.item(), rel=1e-6)
    kept = bayesian_layer()  # the same unmasked parameters, so the KL of the kept entries by hand
    p = kept.prior_sigma

    def kl(mu, sigma):
        return (math.log(p) - sigma.log() + (sigma**2 + mu**2) / (2 * p * p) - 0.5).sum()

    rows, cols = torch.tensor([0, 2]), torch.tensor([1, 3])
    expected = kl(kept.weight_mu[rows][:, cols], kept.weight_sigma()[rows][:, cols])
    expected = expected + kl(kept.bias_mu[rows], kept.bias_sigma()[rows])
    assert before.item() == pytest.approx(expected.item(), rel=1e-6)


def test_log_sigma_is_clamped_to_its_range():
    layer = bayesian_layer()
    low, high = (math.exp(bound) for bound in LOG_SIGMA_RANGE)
    with torch.no_grad():
        layer.weight_log_sigma.fill_(-50.0)
        layer.bias_log_sigma.fill_(10.0)
    assert torch.allclose(layer.weight_sigma(), torch.tensor(low))
    assert torch.allclose(layer.bias_sigma(), torch.tensor(high))
    assert torch.isfinite(layer.kl_divergence()) and torch.isfinite(layer(torch.randn(2, 4))).all()


def test_invalid_prior_sigma_is_rejected():
    with pytest.raises(ValueError, match="prior_sigma"):
        BayesianLinear(2, 2, prior_sigma=0.0)


# ---- Monte Carlo prediction --------------------------------------------------------------------------------


def test_head_only_mc_equals_full_model_with_the_same_draws():
    model = tiny_model(bayes=True)
    tokens = random_tokens()
    samples = 4
    noise = model.head.draw_noise(samples, torch.Generator().manual_seed(0))
    with torch.no_grad():
        mc = model.mc_logits(tokens, samples, noise=noise)  # (S, batch, classes)
        one_by_one = torch.stack(
            [model(tokens, noise={name: {k: v[s] for k, v in d.items()} for name, d in noise.items()}) for s in range(samples)]
        )
    assert mc.shape == (samples, 5, 3)
    torch.testing.assert_close(mc, one_by_one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mc[0], mc[1])  # the draws are really different networks


def test_mc_with_fixed_noise_does_not_depend_on_batch_companions():
    model = tiny_model(bayes=True)
    tokens = random_tokens(batch=4)
    noise = model.head.draw_noise(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = model.mc_probs(tokens, 3, noise=noise)
        apart = torch.cat([model.mc_probs(tokens[i : i + 1], 3, noise=noise) for i in range(4)], dim=1)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.sum(-1), torch.ones(3, 4))


def test_sampled_weights_give_the_networks_their_noise_draws():
    model = tiny_model(bayes=True)
    model.head.fc1.in_mask[3] = 0.0  # masks apply to the built weights as to the noise path
    tokens = random_tokens()
    noise = model.head.draw_noise(3, torch.Generator().manual_seed(0))
    weights = model.head.sample_weights(noise)
    fc1 = model.head.fc1
    sigma = fc1.weight_log_sigma.clamp(*LOG_SIGMA_RANGE).exp()
    torch.testing.assert_close(weights["fc1"].weight, (fc1.weight_mu + sigma * noise["fc1"]["weight"]) * fc1.in_mask)
    assert weights["fc2"].bias.shape == (3, 8) and torch.all(weights["fc1"].weight[:, :, 3] == 0)
    with torch.no_grad():
        torch.testing.assert_close(model.mc_logits(tokens, 3, noise=weights), model.mc_logits(tokens, 3, noise=noise))


def test_predict_samples_needs_the_count_of_an_unsized_loader_and_checks_it():
    model = tiny_model(bayes=True)
    batches = [(random_tokens(batch=4, seed=seed), None) for seed in range(3)]  # 12 cells
    expected, _ = predict_samples(model, iter(batches), 2, cells=12)
    noise = model.head.draw_noise(2, torch.Generator().manual_seed(0))  # predict_samples' draw for seed 0
    torch.testing.assert_close(torch.from_numpy(expected)[:, 4:8], model.mc_probs(batches[1][0], 2, noise=noise))
    with pytest.raises(TypeError, match="pass `cells`"):
        predict_samples(model, iter(batches), 2)
    for wrong in (11, 13):
        with pytest.raises(ValueError, match="announced"):
            predict_samples(model, iter(batches), 2, cells=wrong)


def test_mc_draws_are_reproducible_with_a_seeded_generator():
    model = tiny_model(bayes=True)
    tokens = random_tokens()
    with torch.no_grad():
        first = model.mc_logits(tokens, 3, generator=torch.Generator().manual_seed(7))
        second = model.mc_logits(tokens, 3, generator=torch.Generator().manual_seed(7))
        other = model.mc_logits(tokens, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second) and not torch.allclose(first, other)


def test_deterministic_mc_equals_the_deterministic_model():
    model = tiny_model(bayes=True)
    model.set_deterministic(True)
    tokens = random_tokens()
    with torch.no_grad():
        mc = model.mc_logits(tokens, 1, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(mc, model(tokens).unsqueeze(0))
    deterministic_head = tiny_model(bayes=False)
    with torch.no_grad():
        logits = deterministic_head.mc_logits(tokens, 2)
    assert torch.equal(logits[0], logits[1])
    assert deterministic_head.kl_divergence().item() == 0.0


def test_to_bayesian_port_keeps_stage_a_predictions_exactly():
    model = tiny_model(bayes=False)
    tokens = random_tokens()
    with torch.no_grad():
        stage_a = model(tokens)
    model.to_bayesian(prior_sigma=0.05, init_log_sigma=-4.0)
    assert model.is_bayesian and model.config.head.bayes and model.config.head.prior_sigma == 0.05
    fc1 = model.head.fc1
    assert isinstance(fc1, BayesianLinear) and torch.allclose(fc1.weight_sigma(), torch.tensor(math.exp(-4.0)))
    model.set_deterministic(True)
    with torch.no_grad():
        assert torch.equal(model(tokens), stage_a)
    model.set_deterministic(False)
    assert model.kl_divergence() > 0
    with torch.no_grad():
        assert not torch.equal(model(tokens), stage_a)


def test_kl_of_model_sums_its_bayesian_layers():
    model = tiny_model(bayes=True)
    expected = model.head.fc1.kl_divergence() + model.head.fc2.kl_divergence()
    torch.testing.assert_close(model.kl_divergence(), expected)
