"""FAVOR+ kernel math as pure functions (Choromanski et al., "Rethinking Attention with Performers", 2021).

Shapes: queries/keys/values are (batch, heads, genes, dim_head); random features are (batch, heads, genes, features).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SOFTMAX_FEATURE_EPS = 1e-4  # added to every positive feature, as in the reference, so no row of features is all zero
RELU_FEATURE_EPS = 1e-3


def default_nb_features(dim_head: int) -> int:
    """The paper's default number of random features, d·ln(d)."""
    return int(dim_head * math.log(dim_head))


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_columns: int,
    *,
    scaling: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random projection (nb_rows, nb_columns) whose rows are orthogonal within each block of nb_columns rows.

    Orthogonal rows lower the variance of the softmax-kernel estimate. With scaling=0 the row norms follow the
    chi distribution of Gaussian rows (unbiased estimator); with scaling=1 every row has norm sqrt(nb_columns).
    Drawn on the CPU (QR there is deterministic for a given generator); callers move it to their device.
    """
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        gaussian = torch.randn(nb_columns, nb_columns, generator=generator)
        orthonormal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthonormal.T[: nb_rows - start])
    directions = torch.cat(blocks)
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
    elif scaling == 1:
        norms = torch.full((nb_rows,), math.sqrt(nb_columns))
    else:
        raise ValueError(f"scaling must be 0 or 1, got {scaling}")
    return directions * norms[:, None]


class _SoftmaxFeatures(torch.autograd.Function):
    """exp(x·w' - |x|²·c/2 - stabiliser) with a hand-written backward.

    Autograd would store the exponent's offset gradient as a negated full-size copy; here the backward is one
    elementwise product and one GEMM against [w' | 1], which also yields the row sums the offset needs.
    """

    @staticmethod
    def forward(ctx, data: Tensor, projection: Tensor, is_query: bool) -> Tensor:
        # data (b, h, n, d); projection (m, d), already scaled by d^-1/4
        normalizer_sq = data.shape[-1] ** -0.5
        exponent = data @ projection.T  # (b, h, n, m)
        max_dims = (-1,) if is_query else (-2, -1)
        offset = data.pow(2).sum(dim=-1, keepdim=True).mul_(normalizer_sq / 2)  # (b, h, n, 1)
        offset = offset + exponent.amax(dim=max_dims, keepdim=True)
        features = exponent.sub_(offset).exp_()
        ctx.save_for_backward(data, projection, features)
        return features

    @staticmethod
    def backward(ctx, grad_features: Tensor):
        data, projection, features = ctx.saved_tensors
        grad_exponent = grad_features * features  # (b, h, n, m)
        extended = torch.cat([projection, projection.new_ones(projection.shape[0], 1)], dim=1)  # (m, d+1)
        combined = grad_exponent @ extended  # (b, h, n, d+1): gradient through w' and the row sums
        grad_data = combined[..., :-1] - combined[..., -1:] * data * data.shape[-1] ** -0.5
        return grad_data, None, None


def softmax_kernel(data: Tensor, projection: Tensor, *, is_query: bool) -> Tensor:
    """Positive random features of exp(q·k / sqrt(d)), without the +eps offset (see `linear_attention`).

    data (b, h, n, d), projection (m, d) -> (b, h, n, m). The exponent is stabilised by subtracting its maximum:
    per row for queries, per (batch, head) for keys, treated as a constant because it only rescales the
    features. The global factor m^-1/2 of the paper cancels between numerator and denominator of linear
    attention and is left out.
    """
    normalizer = data.shape[-1] ** -0.25
    return _SoftmaxFeatures.apply(data, projection * normalizer, is_query)


def relu_kernel(data: Tensor, projection: Tensor) -> Tensor:
    """Generalized-attention features relu(q·w) without the +eps offset: (b, h, n, d) -> (b, h, n, m)."""
    normalizer = data.shape[-1] ** -0.25
    return torch.relu(data @ (projection * normalizer).T)


def linear_attention(q_features: Tensor, k_features: Tensor, v: Tensor, feature_eps: float = 0.0) -> Tensor:
    """Bidirectional linear attention D^-1 (Q' (K'^T V)) with Q' = q_features + eps and K' = k_features + eps.

    V gets a column of ones, so one GEMM gives both K'^T V and the key sums, and one more gives numerator and
    denominator. The eps offset is applied analytically instead of materialising two more (b, h, n, m) tensors.
    q/k features (b, h, n, m), v (b, h, n, e) -> (b, h, n, e).
    """
    v_ones = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # (b, h, n, e+1)
    context = k_features.transpose(-1, -2) @ v_ones  # (b, h, m, e+1); last column: key sums
    if feature_eps:
        context = context + feature_eps * v_ones.sum(dim=-2, keepdim=True)
    out = q_features @ context  # (b, h, n, e+1); last column: denominators
    if feature_eps:
        out = out + feature_eps * context.sum(dim=-2, keepdim=True)
    return out[..., :-1] / out[..., -1:]


def exact_softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Quadratic softmax(q kᵀ / sqrt(d)) v, the quantity FAVOR+ approximates (for tests and benchmarks)."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
