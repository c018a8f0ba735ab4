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


def softmax_kernel(data: Tensor, projection: Tensor, *, is_query: bool) -> Tensor:
    """Positive random features of exp(q·k / sqrt(d)), without the +eps offset (see `linear_attention`).

    data (b, h, n, d), projection (m, d) -> (b, h, n, m). The exponent is stabilised by subtracting its maximum:
    per row for queries, per (batch, head) for keys, detached because it only rescales the features. The global
    factor m^-1/2 of the paper cancels between numerator and denominator of linear attention and is left out.
    """
    normalizer = data.shape[-1] ** -0.25
    exponent = data @ (projection * normalizer).T  # (b, h, n, m)
    half_sq_norm = data.pow(2).sum(dim=-1, keepdim=True) * (normalizer**2 / 2)  # (b, h, n, 1)
    with torch.no_grad():
        max_dims = (-1,) if is_query else (-2, -1)
        stabiliser = exponent.amax(dim=max_dims, keepdim=True)
    # In-place: the matmul's backward does not need its output, so this saves one (b, h, n, m) buffer.
    return exponent.sub_(half_sq_norm + stabiliser).exp()


def relu_kernel(data: Tensor, projection: Tensor) -> Tensor:
    """Generalized-attention features relu(q·w) without the +eps offset: (b, h, n, d) -> (b, h, n, m)."""
    normalizer = data.shape[-1] ** -0.25
    return torch.relu(data @ (projection * normalizer).T)


def linear_attention(q_features: Tensor, k_features: Tensor, v: Tensor, feature_eps: float = 0.0) -> Tensor:
    """Bidirectional linear attention D^-1 (Q' (K'^T V)) with Q' = q_features + eps and K' = k_features + eps.

    The eps offset is applied analytically (sums of V and of the features) instead of materialising two more
    (b, h, n, m) tensors. q/k features (b, h, n, m), v (b, h, n, e) -> (b, h, n, e).
    """
    n = k_features.shape[-2]
    context = k_features.transpose(-1, -2) @ v  # (b, h, m, e)
    k_sum = k_features.sum(dim=-2)  # (b, h, m)
    if feature_eps:
        context = context + feature_eps * v.sum(dim=-2, keepdim=True)
        k_sum = k_sum + feature_eps * n
    numerator = q_features @ context  # (b, h, n, e)
    denominator = q_features @ k_sum.unsqueeze(-1)  # (b, h, n, 1)
    if feature_eps:
        numerator = numerator + feature_eps * context.sum(dim=-2, keepdim=True)
        denominator = denominator + feature_eps * k_sum.sum(dim=-1, keepdim=True).unsqueeze(-1)
    return numerator / denominator


def exact_softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Quadratic softmax(q kᵀ / sqrt(d)) v, the quantity FAVOR+ approximates (for tests and benchmarks)."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
