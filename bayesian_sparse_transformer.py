"""The Bayesian sparse transformer: scBERT's Performer encoder + a Bayesian, structurally prunable classifier head.

Data flow: tokens (batch, genes+1) -> encoder -> encodings (batch, genes+1, dim) -> head -> logits. The encoder is
deterministic, so Monte Carlo prediction encodes once and samples only the head, vectorised over samples:
logits (samples, batch, classes). Novelty statistics live in `novelty.py`, the checkpoint format in `checkpoints.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from tqdm.auto import tqdm

from novelty import (
    NOVELTY_LAYER,
    NOVELTY_LAYERS,
    MemberNovelty,
    expression_bins,
    input_projection,
    novelty_evidence,
    novelty_parts,
    novelty_score,
    numpy_statistics,
    training_cells,
)
from performer_pytorch import PerformerConfig, PerformerLM
from utils import autocast

PRUNABLE_LAYERS = ("fc1", "fc2")
PRUNE_MODES = ("physical", "mask")
# How a slice (a neuron's weights) is ranked for removal: l2 = norm of its posterior means; snr = mean |mu| / sigma
# of its weights, the posterior's own signal-to-noise (a weight the posterior cannot tell from 0 is not needed).
PRUNE_SCORES = ("l2", "snr")
LOG_SIGMA_RANGE = (-12.0, 0.0)  # sigma in [6e-6, 1]: no collapse to a point mass, no noise swamping the mean

# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class StructuredMask(nn.Module):
    """Row (output) and column (input) masks for structured pruning in `mask` mode; all ones until pruned."""

    def _init_masks(self, in_features: int, out_features: int) -> None:
        self.register_buffer("out_mask", torch.ones(out_features))
        self.register_buffer("in_mask", torch.ones(in_features))

    def weight_mask(self) -> Tensor:
        return self.out_mask[:, None] * self.in_mask[None, :]  # (out, in)


class PrunableLinear(StructuredMask):
    """A deterministic linear layer (scBERT's nn.Linear, same parameter names) with structured masks."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        reference = nn.Linear(in_features, out_features)  # PyTorch's default initialisation
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())
        self._init_masks(in_features, out_features)

    def mean_weight(self) -> Tensor:
        return self.weight * self.weight_mask()

    def forward(self, x: Tensor, noise: dict[str, Tensor] | None = None) -> Tensor:
        return F.linear(x, self.mean_weight(), self.bias * self.out_mask)


def standard_noise(out_features: int, in_features: int, num_samples: int,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Standard normal draws for one layer: weight (S, out, in), then bias (S, out), on the generator's device."""
    device = generator.device if generator is not None else None
    return {"weight": torch.randn((num_samples, out_features, in_features), generator=generator, device=device),
            "bias": torch.randn((num_samples, out_features), generator=generator, device=device)}


class SampledWeights(NamedTuple):
    """S networks' weights (S, out, in) and biases (S, out) of one Bayesian layer, built from `draw_noise`'s noise
    once (`BayesianLinear.sample_weights`): given instead of the noise, they serve every batch of a prediction
    where the noise would be turned into weights again for each batch."""

    weight: Tensor
    bias: Tensor


class BayesianLinear(StructuredMask):
    """Linear layer with a mean-field Gaussian posterior over weight and bias, trained by variational inference.

    q(w) = N(mu, sigma^2) with sigma = exp(log_sigma) clamped to LOG_SIGMA_RANGE; prior N(0, prior_sigma^2).
    `deterministic=True` uses the means (pre-warm epochs, MAP prediction). With `local_reparam=True` training
    samples pre-activations instead of weights (Kingma et al., 2015): lower-variance gradients, no weight sample.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        prior_sigma: float = 0.1,
        init_log_sigma: float = -5.0,
        local_reparam: bool = False,
    ):
        super().__init__()
        if prior_sigma <= 0:
            raise ValueError(f"prior_sigma must be positive, got {prior_sigma}")
        reference = nn.Linear(in_features, out_features)
        self.weight_mu = nn.Parameter(reference.weight.detach().clone())
        self.bias_mu = nn.Parameter(reference.bias.detach().clone())
        self.weight_log_sigma = nn.Parameter(torch.full((out_features, in_features), float(init_log_sigma)))
        self.bias_log_sigma = nn.Parameter(torch.full((out_features,), float(init_log_sigma)))
        self._init_masks(in_features, out_features)
        self.prior_sigma = prior_sigma
        self.local_reparam = local_reparam
        self.deterministic = False

    @property
    def in_features(self) -> int:
        return self.weight_mu.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_mu.shape[0]

    def weight_sigma(self) -> Tensor:
        return self.weight_log_sigma.clamp(*LOG_SIGMA_RANGE).exp()

    def bias_sigma(self) -> Tensor:
        return self.bias_log_sigma.clamp(*LOG_SIGMA_RANGE).exp()

    def mean_weight(self) -> Tensor:
        return self.weight_mu * self.weight_mask()

    def draw_noise(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Standard normal noise for `num_samples` weight draws: weight (S, out, in), bias (S, out)."""
        noise = standard_noise(self.out_features, self.in_features, num_samples, generator)
        return {name: value.to(self.weight_mu.device) for name, value in noise.items()}

    def sample_weights(self, noise: dict[str, Tensor]) -> SampledWeights:
        """The weights and biases `noise` (from `draw_noise`) draws: (S, out, in) and (S, out), or without S."""
        return SampledWeights((self.weight_mu + self.weight_sigma() * noise["weight"]) * self.weight_mask(),
                              (self.bias_mu + self.bias_sigma() * noise["bias"]) * self.out_mask)

    def forward(self, x: Tensor, noise: dict[str, Tensor] | SampledWeights | None = None) -> Tensor:
        """x (batch, in) or (S, batch, in); `noise` from `draw_noise` (or its `sample_weights`) gives (S, batch, out),
        else (…, out)."""
        if self.deterministic:
            return F.linear(x, self.mean_weight(), self.bias_mu * self.out_mask)
        if noise is None and self.local_reparam:
            mask = self.weight_mask()
            mean = F.linear(x, self.weight_mu * mask, self.bias_mu * self.out_mask)
            # Variances in fp32 even under autocast: in fp16 small ones round to 0 and sqrt's gradient explodes.
            with torch.autocast(device_type=x.device.type, enabled=False):
                var = F.linear(x.float().pow(2), (self.weight_sigma() * mask).pow(2), (self.bias_sigma() * self.out_mask).pow(2))
            return mean + (var.clamp_min(1e-16).sqrt() * torch.randn_like(var)).to(mean.dtype)
        if noise is None:
            noise = {name: value[0] for name, value in self.draw_noise(1).items()}
        weight, bias = noise if isinstance(noise, SampledWeights) else self.sample_weights(noise)
        if weight.dim() == 2:
            return F.linear(x, weight, bias)
        if x.dim() == 2:  # the same inputs for every sample (the first Bayesian layer after the encoder)
            x = x.expand(weight.shape[0], *x.shape)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # (S, batch, out)

    def kl_divergence(self) -> Tensor:
        """Closed-form KL(q || prior) summed over unpruned weights and biases."""

        def kl(mu: Tensor, sigma: Tensor) -> Tensor:
            p = self.prior_sigma
            return math.log(p) - sigma.log() + (sigma.pow(2) + mu.pow(2)) / (2 * p * p) - 0.5

        weight_kl = (kl(self.weight_mu, self.weight_sigma()) * self.weight_mask()).sum()
        return weight_kl + (kl(self.bias_mu, self.bias_sigma()) * self.out_mask).sum()

    @classmethod
    def from_linear(
        cls, layer: PrunableLinear, *, prior_sigma: float, init_log_sigma: float, local_reparam: bool
    ) -> BayesianLinear:
        """Port a trained deterministic layer: its weights become the posterior means (Stage A -> Stage B)."""
        out_features, in_features = layer.weight.shape
        bayes = cls(
            in_features, out_features, prior_sigma=prior_sigma, init_log_sigma=init_log_sigma,
            local_reparam=local_reparam,
        ).to(layer.weight.device)
        with torch.no_grad():
            bayes.weight_mu.copy_(layer.weight)
            bayes.bias_mu.copy_(layer.bias)
            bayes.out_mask.copy_(layer.out_mask)
            bayes.in_mask.copy_(layer.in_mask)
        return bayes


# --------------------------------------------------------------------------------------------------------------
# Classifier head (scBERT's `Identity` head)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class HeadConfig:
    """scBERT's head: conv over dim -> ReLU -> fc1 -> ReLU/dropout -> fc2 -> ReLU/dropout -> fc3.

    hidden1/hidden2/kept_inputs are the current (possibly physically pruned) widths; base_* the original ones.
    """

    seq_len: int
    dim: int
    num_classes: int
    hidden1: int = 512
    hidden2: int = 128
    dropout: float = 0.0
    bayes: bool = False
    prior_sigma: float = 0.1
    init_log_sigma: float = -5.0
    local_reparam: bool = False
    kept_inputs: int | None = None  # gene positions fc1 still reads after physical column pruning
    base_hidden1: int | None = None
    base_hidden2: int | None = None
    temperature: float = 1.0  # divides the logits of predicted probabilities (post-hoc calibration); 1 in training
    # A Bayesian head whose posterior means predicted better than its samples on validation predicts with them
    # (Stage B keeps the better of the two); False while training.
    posterior_means: bool = False

    def __post_init__(self) -> None:
        self.base_hidden1 = self.base_hidden1 or self.hidden1
        self.base_hidden2 = self.base_hidden2 or self.hidden2

    @property
    def fc1_in(self) -> int:
        return self.seq_len if self.kept_inputs is None else self.kept_inputs


class ClassifierHead(nn.Module):
    """Maps encodings (batch, genes+1, dim) to logits (batch, classes), or (S, batch, classes) given noise."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        c = self.config = config
        self.conv1 = nn.Conv2d(1, 1, (1, c.dim))  # scBERT's per-gene projection; kept as Conv2d for its key names
        # Gene positions fc1 reads after physical column pruning; None (not saved) while fc1 reads them all.
        self.register_buffer("input_index", None if c.kept_inputs is None else torch.arange(c.kept_inputs))
        self.fc1 = self._make_linear(c.fc1_in, c.hidden1)
        self.fc2 = self._make_linear(c.hidden1, c.hidden2)
        self.fc3 = nn.Linear(c.hidden2, c.num_classes)
        self.dropout1 = nn.Dropout(c.dropout)
        self.dropout2 = nn.Dropout(c.dropout)

    def _make_linear(self, in_features: int, out_features: int) -> nn.Module:
        c = self.config
        if c.bayes:
            return BayesianLinear(
                in_features, out_features, prior_sigma=c.prior_sigma, init_log_sigma=c.init_log_sigma,
                local_reparam=c.local_reparam,
            )
        return PrunableLinear(in_features, out_features)

    def bayesian_layers(self) -> dict[str, BayesianLinear]:
        return {name: layer for name, layer in (("fc1", self.fc1), ("fc2", self.fc2)) if isinstance(layer, BayesianLinear)}

    def gene_features(self, encodings: Tensor) -> Tensor:
        """(batch, genes+1, dim) -> (batch, fc1_in): the conv is a dot product over dim, done as one GEMV."""
        weight = self.conv1.weight.view(1, -1)  # (1, dim)
        features = torch.relu(F.linear(encodings, weight, self.conv1.bias).squeeze(-1))
        if self.input_index is not None:
            features = features.index_select(1, self.input_index)
        return features

    def draw_noise(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, dict[str, Tensor]]:
        return {name: layer.draw_noise(num_samples, generator) for name, layer in self.bayesian_layers().items()}

    def sample_weights(self, noise: dict[str, dict[str, Tensor]]) -> dict[str, SampledWeights]:
        """`draw_noise`'s noise as each Bayesian layer's sampled weights, to pass as `noise` to every batch."""
        return {name: layer.sample_weights(noise[name]) for name, layer in self.bayesian_layers().items()}

    def classify(self, features: Tensor, noise: dict[str, dict[str, Tensor] | SampledWeights] | None = None) -> Tensor:
        noise = noise or {}
        x = self.dropout1(torch.relu(self.fc1(features, noise.get("fc1"))))
        x = self.dropout2(torch.relu(self.fc2(x, noise.get("fc2"))))
        return self.fc3(x)

    def forward(self, encodings: Tensor, noise: dict[str, dict[str, Tensor]] | None = None) -> Tensor:
        return self.classify(self.gene_features(encodings), noise)

    def novelty_features(self, features: Tensor, layer: str = NOVELTY_LAYER) -> Tensor:
        """The representation novelty is measured in: (batch, fc1_in) gene features -> (batch, hidden2) for "fc2".

        "fc2" is fc2's ReLU output with the posterior means (no sampling, no dropout), so it is one fixed function
        of the cell; "gene_features" is fc1's input itself.
        """
        if layer == "gene_features":
            return features
        if layer != "fc2":
            raise ValueError(f"novelty layer must be one of {NOVELTY_LAYERS}, got {layer!r}")
        hidden = torch.relu(_mean_linear(self.fc1, features))
        return torch.relu(_mean_linear(self.fc2, hidden))


def _mean_parameters(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) a layer computes with when its posterior is replaced by its means (masks applied)."""
    if isinstance(layer, nn.Linear):  # fc3
        return layer.weight, layer.bias
    bias = layer.bias_mu if isinstance(layer, BayesianLinear) else layer.bias
    return layer.mean_weight(), bias * layer.out_mask


def _mean_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """A PrunableLinear or BayesianLinear with its (masked) mean weights, whatever its `deterministic` flag."""
    return F.linear(x, *_mean_parameters(layer))


# --------------------------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    encoder: PerformerConfig
    head: HeadConfig

    def to_dict(self) -> dict:
        return {"encoder": asdict(self.encoder), "head": asdict(self.head)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(encoder=PerformerConfig(**data["encoder"]), head=HeadConfig(**data["head"]))


class BayesianSparseTransformer(nn.Module):
    """PerformerLM encoder + ClassifierHead. forward(tokens (batch, genes+1)) -> logits (batch, classes)."""

    def __init__(self, config: ModelConfig, gene_vectors: Tensor | None = None):
        super().__init__()
        self.config = config
        self.encoder = PerformerLM(config.encoder, gene_vectors)
        self.head = ClassifierHead(config.head)

    @property
    def is_bayesian(self) -> bool:
        return bool(self.head.bayesian_layers())

    def encode(self, tokens: Tensor) -> Tensor:
        return self.encoder(tokens)  # (batch, genes+1, dim)

    def forward(self, tokens: Tensor, noise: dict | None = None) -> Tensor:
        return self.head(self.encode(tokens), noise)

    def set_deterministic(self, deterministic: bool) -> None:
        """Use posterior means (True) or sample weights (False) in every Bayesian layer; a head that predicts with
        its posterior means (HeadConfig.posterior_means) always uses them."""
        for layer in self.head.bayesian_layers().values():
            layer.deterministic = deterministic or self.config.head.posterior_means

    def kl_divergence(self) -> Tensor:
        layers = self.head.bayesian_layers().values()
        if not layers:
            return self.head.fc3.weight.new_zeros(())
        return sum(layer.kl_divergence() for layer in layers)

    def mc_logits(
        self,
        tokens: Tensor,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
        noise: dict | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """Encode once, then sample the head: logits (S, batch, classes).

        Pass the same `noise` (from `self.head.draw_noise`) for every batch to evaluate one fixed set of S networks:
        predictions then depend neither on batch size nor on batch order. `features` (the head's gene features of
        `tokens`, when the caller needs them too) skips the encoder.
        """
        if features is None:
            features = self.head.gene_features(self.encode(tokens))  # (batch, fc1_in)
        if self.config.head.posterior_means:
            self.set_deterministic(True)
        if not self.samples_head():
            return self.head.classify(features).expand(num_samples, -1, -1)
        if noise is None:
            noise = self.head.draw_noise(num_samples, generator)
        return self.head.classify(features, noise)

    def samples_head(self) -> bool:
        """Whether `mc_logits` draws head networks: a Bayesian head, neither in deterministic mode nor set to
        predict with its posterior means."""
        return (self.is_bayesian and not self.config.head.posterior_means
                and not all(layer.deterministic for layer in self.head.bayesian_layers().values()))

    def mc_probs(self, tokens: Tensor, num_samples: int, **kwargs) -> Tensor:
        """Calibrated probabilities (S, batch, classes): softmax of the sampled logits / the head's temperature."""
        logits = self.mc_logits(tokens, num_samples, **kwargs).float()
        return (logits / self.config.head.temperature).softmax(dim=-1)

    def to_bayesian(self, *, prior_sigma: float = 0.1, init_log_sigma: float = -5.0, local_reparam: bool = False) -> None:
        """Turn fc1/fc2 into Bayesian layers whose means are the trained weights (in place)."""
        if self.is_bayesian:
            return
        for name in PRUNABLE_LAYERS:
            layer = getattr(self.head, name)
            setattr(
                self.head, name,
                BayesianLinear.from_linear(layer, prior_sigma=prior_sigma, init_log_sigma=init_log_sigma, local_reparam=local_reparam),
            )
        self.config.head = replace(
            self.config.head, bayes=True, prior_sigma=prior_sigma, init_log_sigma=init_log_sigma, local_reparam=local_reparam
        )
        self.head.config = self.config.head

    # ---- structured pruning ---------------------------------------------------------------------------------

    def group_norm(self, layers: tuple[str, ...] = PRUNABLE_LAYERS, dim: int = 0) -> Tensor:
        """Sum of the L2 norms of the slices `prune` would remove: the group-lasso penalty, differentiable."""
        return sum(slice_norms(getattr(self.head, name), dim).sum() for name in layers)

    def prune(self, amount: float, *, layers: tuple[str, ...] = PRUNABLE_LAYERS, dim: int = 0, mode: str = "physical",
              score: str = "l2", refit_features: Tensor | None = None, refit_weights: Tensor | None = None,
              refit_ridge: float = 0.01) -> dict:
        """Remove the lowest-scoring slices of fc1/fc2 until `amount` of each layer's original slices are gone.

        dim=0 prunes rows (output neurons), dim=1 columns (inputs). `score` ranks the slices (PRUNE_SCORES): "l2"
        the norm of the posterior means, "snr" the mean |mu| / sigma of the slice's weights (Bayesian head only).
        `mask` zeroes the slices in place (weights, biases and, for the next layer, the matching inputs);
        `physical` rebuilds the layers smaller so the pruned head really is smaller and faster.

        The returned `pruning_stats()` carry "kept": for each unit this call shrank ("inputs", "hidden1",
        "hidden2"), the positions it kept among the unit's slices before the call (see `slice_head_noise`).

        With `refit_features` (cells, fc1_in: the head's gene features of training cells, as `gene_features` gives
        them now) the layer that reads the removed units is refitted so that its pre-activations on those cells
        change as little as possible: a least-squares fit on the kept units, each cell weighted by `refit_weights`
        (cells,; e.g. class-balancing weights, so rare types count as they did in training), shrunk toward the old
        weights by `refit_ridge` (relative to the units' mean second moment). The next layer then no longer waits
        for fine-tuning to make up for what was lost.
        """
        if not 0.0 <= amount < 1.0:
            raise ValueError(f"amount must be in [0, 1), got {amount}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim}")
        if mode not in PRUNE_MODES:
            raise ValueError(f"mode must be one of {PRUNE_MODES}, got {mode!r}")
        if score not in PRUNE_SCORES:
            raise ValueError(f"score must be one of {PRUNE_SCORES}, got {score!r}")
        if score == "snr" and not self.is_bayesian:
            raise ValueError("snr scoring needs a Bayesian head (its posterior sigmas); use l2 for a deterministic one")
        kept = {}
        for name in layers:
            if name not in PRUNABLE_LAYERS:
                raise ValueError(f"can only prune {PRUNABLE_LAYERS}, got {name!r}")
            unit = _prunable_unit(name, dim)
            layer = getattr(self.head, name)
            active = layer.out_mask if dim == 0 else layer.in_mask
            keep = _choose_kept(slice_scores(layer, dim, score), active, self._base_width(unit), amount)
            if keep is None:
                continue
            refit = None if refit_features is None else self._refit_consumer(unit, keep, refit_features, refit_weights, refit_ridge)
            (self._remove_physically if mode == "physical" else self._remove_by_mask)(unit, keep)
            if refit is not None:
                self._set_consumer(unit, keep, *refit, physical=mode == "physical")
                if unit == "inputs" and mode == "physical":  # fc1 now reads only the kept gene positions
                    refit_features = refit_features[:, keep]
            kept[unit] = keep
        return self.pruning_stats() | {"kept": kept}

    def _unit_activations(self, unit: str, features: Tensor) -> Tensor:
        """(cells, width) of a prunable unit on the head's gene features, with the posterior means."""
        if unit == "inputs":
            return features
        hidden = torch.relu(_mean_linear(self.head.fc1, features))
        return hidden if unit == "hidden1" else torch.relu(_mean_linear(self.head.fc2, hidden))

    @torch.no_grad()
    def _refit_consumer(self, unit: str, keep: Tensor, features: Tensor, cell_weights: Tensor | None,
                        ridge: float) -> tuple[Tensor, Tensor]:
        """The consumer's new (weight over the kept units, bias): ridge regression toward the old weights."""
        consumer = getattr(self.head, _UNIT_LAYERS[unit][1])
        weight, bias = _mean_parameters(consumer)  # (out, width), (out,)
        acts = self._unit_activations(unit, features).double()  # (cells, width)
        weight, bias = weight.double(), bias.double()
        target = acts @ weight.T + bias  # (cells, out): what the consumer computes now
        design = torch.cat([acts[:, keep], torch.ones(len(acts), 1, dtype=acts.dtype, device=acts.device)], 1)
        weighted = design if cell_weights is None else design * cell_weights.double().to(design.device)[:, None]
        gram = weighted.T @ design
        shrink = ridge * gram.diagonal().mean()
        prior = torch.cat([weight[:, keep], bias[:, None]], 1).T  # (kept + 1, out)
        eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        solution = torch.linalg.solve(gram + shrink * eye, weighted.T @ target + shrink * prior)
        return solution[:-1].T.float(), solution[-1].float()

    @torch.no_grad()
    def _set_consumer(self, unit: str, keep: Tensor, weight: Tensor, bias: Tensor, *, physical: bool) -> None:
        consumer = getattr(self.head, _UNIT_LAYERS[unit][1])
        weight_name, bias_name = ("weight_mu", "bias_mu") if isinstance(consumer, BayesianLinear) else ("weight", "bias")
        if physical:  # the consumer already reads only the kept units
            getattr(consumer, weight_name).copy_(weight)
        else:
            getattr(consumer, weight_name)[:, keep] = weight
        getattr(consumer, bias_name).copy_(bias)

    def _base_width(self, unit: str) -> int:
        c = self.config.head
        return {"inputs": c.seq_len, "hidden1": c.base_hidden1, "hidden2": c.base_hidden2}[unit]

    def _remove_by_mask(self, unit: str, keep: Tensor) -> None:
        producer, consumer = _UNIT_LAYERS[unit]
        with torch.no_grad():
            if producer is None:
                mask = getattr(self.head, consumer).in_mask
            else:
                mask = getattr(self.head, producer).out_mask
            mask.zero_()[keep] = 1.0
            if producer is not None and consumer != "fc3":
                getattr(self.head, consumer).in_mask.copy_(mask)

    def _remove_physically(self, unit: str, keep: Tensor) -> None:
        head = self.head
        producer, consumer = _UNIT_LAYERS[unit]
        if producer is not None:
            setattr(head, producer, _slice_layer(getattr(head, producer), rows=keep))
        setattr(head, consumer, _slice_layer(getattr(head, consumer), cols=keep))
        c = self.config.head
        if unit == "inputs":
            current = head.input_index if head.input_index is not None else torch.arange(c.seq_len, device=keep.device)
            head.input_index = current[keep].clone()
            c.kept_inputs = len(keep)
        else:
            setattr(c, unit, len(keep))

    def pruning_stats(self) -> dict:
        """Parameter counts and per-layer structured sparsity relative to the unpruned head."""
        c = self.config.head
        base_shapes = {"fc1": (c.base_hidden1, c.seq_len), "fc2": (c.base_hidden2, c.base_hidden1)}
        stats: dict = {"layers": {}}
        active_total = base_total = 0
        for name in PRUNABLE_LAYERS:
            layer = getattr(self.head, name)
            rows, cols = int(layer.out_mask.sum()), int(layer.in_mask.sum())
            base_rows, base_cols = base_shapes[name]
            active_total += rows * cols
            base_total += base_rows * base_cols
            stats["layers"][name] = {
                "shape": list(layer.mean_weight().shape),
                "active_rows": rows,
                "active_cols": cols,
                "row_sparsity": 1 - rows / base_rows,
                "col_sparsity": 1 - cols / base_cols,
                "weight_sparsity": 1 - rows * cols / (base_rows * base_cols),
            }
        stats["fc12_sparsity"] = 1 - active_total / base_total
        stats["fc12_active_weights"] = active_total
        stats["fc12_base_weights"] = base_total
        stats["total_params"] = sum(p.numel() for p in self.parameters())
        stats["head_params"] = sum(p.numel() for p in self.head.parameters())
        stats["nonzero_params"] = _count_nonzero_effective(self)
        return stats


# Which layer produces and which consumes each prunable unit: pruning a unit removes rows of the producer and
# columns of the consumer (fc1 column pruning removes gene positions: there is no producer layer to shrink).
_UNIT_LAYERS = {"inputs": (None, "fc1"), "hidden1": ("fc1", "fc2"), "hidden2": ("fc2", "fc3")}


def _prunable_unit(layer: str, dim: int) -> str:
    if dim == 0:
        return "hidden1" if layer == "fc1" else "hidden2"
    return "inputs" if layer == "fc1" else "hidden1"


def unit_widths(model: BayesianSparseTransformer) -> dict[str, int]:
    """The current widths of the prunable units: fc1's inputs, and the two hidden layers."""
    fc1_out, fc1_in = model.head.fc1.mean_weight().shape
    return {"inputs": int(fc1_in), "hidden1": int(fc1_out), "hidden2": int(model.head.fc2.mean_weight().shape[0])}


def head_noise_for_widths(widths: dict[str, int], num_samples: int, seed: int) -> dict[str, dict[str, Tensor]]:
    """What `head.draw_noise(num_samples, Generator().manual_seed(seed))` gives a Bayesian head of these widths."""
    generator = torch.Generator().manual_seed(seed)
    return {name: standard_noise(widths[out_unit], widths[in_unit], num_samples, generator)
            for name, (out_unit, in_unit) in (("fc1", ("hidden1", "inputs")), ("fc2", ("hidden2", "hidden1")))}


def slice_head_noise(noise: dict[str, dict[str, Tensor]], positions: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A head's noise (`draw_noise`) restricted to the units a physically pruned copy kept.

    `positions` maps "inputs", "hidden1" and "hidden2" to the kept positions among the original units (all when
    absent). The pruned head then draws exactly the weights the original drew for what they share: comparing
    the two with these common random numbers measures pruning, not Monte Carlo noise.
    """
    def take(tensor: Tensor, dim: int, unit: str) -> Tensor:
        return tensor if unit not in positions else tensor.index_select(dim, positions[unit].to(tensor.device))

    units = {"fc1": ("hidden1", "inputs"), "fc2": ("hidden2", "hidden1")}
    return {name: {"weight": take(take(draws["weight"], 1, units[name][0]), 2, units[name][1]),
                   "bias": take(draws["bias"], 1, units[name][0])} for name, draws in noise.items()}


def slice_norms(layer: nn.Module, dim: int) -> Tensor:
    """L2 norm of each slice of `layer`'s posterior-mean weight along `dim` (rows for 0, columns for 1)."""
    return layer.mean_weight().norm(p=2, dim=1 - dim)


def slice_scores(layer: nn.Module, dim: int, score: str = "l2") -> Tensor:
    """One score per slice of `layer` along `dim` (rows for 0, columns for 1); higher = more worth keeping."""
    with torch.no_grad():
        if score == "snr":
            snr = layer.weight_mu.abs() / layer.weight_sigma()
            return (snr * layer.weight_mask()).mean(dim=1 - dim)
        return slice_norms(layer, dim)


def _choose_kept(scores: Tensor, active: Tensor, base_width: int, amount: float) -> Tensor | None:
    """Sorted indices of the slices to keep (the highest `scores`), or None when nothing has to go.

    `active` marks slices not yet pruned by mask; masked slices are never kept, so a physical prune after a masked
    one drops them too.
    """
    target = base_width - round(amount * base_width)
    n_active = int(active.sum())
    if n_active <= target and n_active == active.numel():
        return None
    scores = scores.masked_fill(active == 0, -1.0)
    return torch.topk(scores, min(target, n_active), sorted=False).indices.sort().values


def _slice_layer(layer: nn.Module, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Module:
    """A copy of `layer` keeping only the given rows/columns (means, variances, biases and masks alike)."""
    out_features, in_features = layer.weight.shape if isinstance(layer, nn.Linear) else layer.mean_weight().shape
    device = next(layer.parameters()).device
    rows = rows if rows is not None else torch.arange(out_features, device=device)
    cols = cols if cols is not None else torch.arange(in_features, device=device)
    if isinstance(layer, nn.Linear):  # fc3 loses the inputs of removed hidden2 neurons
        new = nn.Linear(len(cols), len(rows)).to(layer.weight.device)
        with torch.no_grad():
            new.weight.copy_(layer.weight[rows][:, cols])
            new.bias.copy_(layer.bias[rows])
        return new
    if isinstance(layer, BayesianLinear):
        new = BayesianLinear(len(cols), len(rows), prior_sigma=layer.prior_sigma, local_reparam=layer.local_reparam)
        new.deterministic = layer.deterministic
        pairs = (("weight_mu", "weight_log_sigma"), ("bias_mu", "bias_log_sigma"))
    else:
        new = PrunableLinear(len(cols), len(rows))
        pairs = (("weight", None), ("bias", None))
    new = new.to(device)
    with torch.no_grad():
        for weight_name, sigma_name in pairs:
            for name in filter(None, (weight_name, sigma_name)):
                source = getattr(layer, name)
                getattr(new, name).copy_(source[rows][:, cols] if source.dim() == 2 else source[rows])
        new.out_mask.copy_(layer.out_mask[rows])
        new.in_mask.copy_(layer.in_mask[cols])
    return new


def _count_nonzero_effective(model: BayesianSparseTransformer) -> int:
    """Parameters that still act: fc1/fc2's unmasked weights and biases, fc3 without the inputs of silenced fc2
    neurons, and everything else — so a mask-pruned model counts what its physically pruned twin stores."""
    head = model.head
    total = sum(p.numel() for p in model.parameters())
    for name in PRUNABLE_LAYERS:
        layer = getattr(head, name)
        copies = 2 if isinstance(layer, BayesianLinear) else 1  # mean and sigma per weight
        full = layer.weight_mask().numel() + layer.out_mask.numel()
        active = int(layer.weight_mask().sum() + layer.out_mask.sum())
        total -= copies * (full - active)
    return total - int((head.fc2.out_mask == 0).sum()) * head.fc3.out_features


# --------------------------------------------------------------------------------------------------------------
# Monte Carlo prediction over a dataset
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_proba_samples(
    model: BayesianSparseTransformer,
    loader: Iterable,
    num_samples: int,
    *,
    seed: int = 0,
    noise: dict | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
    cells: int | None = None,
) -> np.ndarray:
    """Class probabilities (S, cells, classes) for every batch of `loader` (batches of (tokens, labels)).

    The S head networks are drawn once from `seed` (or given as `noise`, from `draw_noise`) and shared by all
    batches, so a cell's prediction does not depend on the batch it lands in. A deterministic model (or
    deterministic mode) gives S identical samples. `cells`: as in `predict_samples`.
    """
    return predict_samples(model, loader, num_samples, seed=seed, noise=noise, device=device, amp=amp, progress=progress,
                           cells=cells)[0]


@torch.no_grad()
def predict_samples(
    model: BayesianSparseTransformer,
    loader: Iterable,
    num_samples: int,
    *,
    novelty: dict | None = None,
    seed: int = 0,
    noise: dict | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
    cells: int | None = None,
) -> tuple[np.ndarray, MemberNovelty | None]:
    """`predict_proba_samples`, plus each cell's novelty when `novelty` statistics are given.

    Both come from one encoding of each batch: the encoder is the expensive part. `cells`: how many cells the
    loader yields, needed when it has no sized `dataset` (a DataLoader's is counted).

    Every batch's outputs are written into arrays allocated once for all cells. Kept per batch instead, those
    small arrays sat between the batches' freed activations and the heap could not reuse the gaps: a 10^5-cell
    stream in chunks of 5,000 peaked 390-780 MB above its start (three runs), against 187-194 MB now (see
    allocator.py).
    """
    device = torch.device(device)
    model.eval()
    cells = _cell_count(loader) if cells is None else cells
    if not model.samples_head():
        noise = None
    elif noise is None:
        noise = model.head.draw_noise(num_samples, torch.Generator().manual_seed(seed))
    # The S networks' weights are built once rather than from the noise for every batch (a fifth of a small
    # model's time per cell went there).
    weights = None if noise is None else model.head.sample_weights(noise)
    del noise  # drawn here, it would be a second copy of the weights' size for the whole run
    outputs = torch.empty((num_samples, cells, model.config.head.num_classes))  # (S, cells, classes)
    if novelty is not None:
        novelty = numpy_statistics(novelty)
        scores, trained = np.empty(cells), np.empty(cells, dtype=bool)
        evidence = {name: np.empty(cells) for name in novelty["parts"]}
    done = 0
    # numpy's BLAS on one thread: its products here are a batch of rows each, too small to share, and its idle
    # threads spin between batches against torch's (2 cores, ensemble of 5 on 2,000 cells, one torch thread:
    # 44 -> 116 cells/s in the whole CLI)
    with threadpool_limits(limits=1, user_api="blas"):
        for tokens, _ in tqdm(loader, desc="predicting", unit="batch", disable=not progress):
            rows = slice(done, done + len(tokens))
            if rows.stop > cells:
                raise ValueError(f"the loader yielded more than the {cells} cells it was announced with")
            tokens = tokens.to(device)
            with autocast(device, amp):
                features = model.head.gene_features(model.encode(tokens))  # (batch, fc1_in)
                probs = model.mc_probs(tokens, num_samples, noise=weights, features=features)  # (S, batch, classes)
                if novelty is not None:
                    hidden = model.head.novelty_features(features, novelty["layer"]).float().cpu().numpy()
                    binned = expression_bins(tokens)
                    # One projection per batch serves every input view (statistics without one have no input axes).
                    projected = input_projection(binned, novelty) if "input_components" in novelty else None
                    parts = novelty_parts(hidden, tokens, probs.float().mean(0).cpu().numpy(), novelty, projected)
                    batch_evidence = novelty_evidence(parts, novelty)
                    for name, values in batch_evidence.items():
                        evidence[name][rows] = values
                    scores[rows] = novelty_score(parts, novelty, batch_evidence)
                    trained[rows] = training_cells(binned, novelty)
            outputs[:, rows] = probs
            done = rows.stop
    if done != cells:
        raise ValueError(f"the loader yielded {done} cells, not the {cells} it was announced with")
    if novelty is None:
        return outputs.numpy(), None
    return outputs.numpy(), MemberNovelty(scores, trained, evidence)


def _cell_count(loader: Iterable) -> int:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        raise TypeError("pass `cells` (how many cells the loader yields) for a loader without a sized dataset") from None
