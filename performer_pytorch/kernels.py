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


FUSED_TILE_ELEMENTS = 1 << 23  # (heads, genes, features) tile of the fused CPU path: 32 MB of fp32 (last-level cache)


class _FavorSoftmaxAttention(torch.autograd.Function):
    """FAVOR+ softmax-kernel attention computed in tiles of genes, with a hand-written backward (CPU).

    The (n, m) features of a head are four times the size of its queries (m = 266 > d = 64 at scBERT's size), so
    every pass over them through main memory costs about as much as the GEMM that made them. Here they only ever
    exist as tiles of rows (all heads at once) that stay in cache: made by one GEMM, exponentiated in place and
    consumed at once. The backward recomputes them tile by tile (two GEMMs with k = d) instead of keeping
    2·n·m floats per head and layer.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, projection: Tensor, feature_eps: float) -> Tensor:
        out, contexts, key_maxima, denominators = _favor_tiled_forward(q, k, v, projection, feature_eps)
        ctx.save_for_backward(q, k, v, projection, contexts, key_maxima, denominators, out)
        ctx.feature_eps = feature_eps
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, projection, contexts, key_maxima, denominators, out = ctx.saved_tensors
        eps = ctx.feature_eps
        b, h, n, d = q.shape
        e, m = v.shape[-1], projection.shape[0]
        tiles = _Tiles(q, n, m, e, d)
        # [w' | 1]: one GEMM gives the gradient through the projection and the row sums the |x|² offset needs
        projection_ones = torch.cat([projection, projection.new_ones(m, 1)], dim=1).expand(h, m, d + 1)
        grad_q, grad_k, grad_v = (q.new_empty(b, h, n, x.shape[-1]) for x in (q, k, v))
        for bi in range(b):
            qb, kb, vb, context = q[bi], k[bi], v[bi], contexts[bi]  # (h, n, d) ...; context (h, m, e+1)
            grad_context = q.new_zeros(h, m, e + 1)
            grad_num_sum = q.new_zeros(h, 1, e + 1)
            q_offsets = _half_sq_norms(qb)
            for tile in tiles:
                f = _query_features(qb[:, tile], projection, q_offsets[:, tile], tiles.features(tile))
                g = tiles.numerator(tile)  # d loss / d [numerator | denominator]
                den = denominators[bi, :, tile]
                # out = numerator / denominator
                torch.div(grad_out[bi, :, tile], den, out=g[..., :e])
                torch.sum(g[..., :e] * out[bi, :, tile], dim=-1, keepdim=True, out=g[..., e:])
                g[..., e:].neg_()
                # numerator = (features + eps) @ context
                grad_context.baddbmm_(f.transpose(1, 2), g)
                grad_num_sum += g.sum(dim=1, keepdim=True)
                ge = torch.bmm(g, context.transpose(1, 2), out=tiles.scratch(tile)).mul_(f)  # d loss / d exponent
                _exponent_grad_to_data(ge, qb[:, tile], projection_ones, tiles.data(tile), grad_q[bi, :, tile])
            grad_context.add_(grad_num_sum, alpha=eps)
            k_offsets = _half_sq_norms(kb).add_(key_maxima[bi].view(h, 1, 1))
            grad_v_eps = grad_context[..., :e].sum(dim=1, keepdim=True).mul_(eps)  # (h, 1, e)
            for tile in tiles:
                f = torch.bmm(kb[:, tile], projection.T.expand(h, d, m), out=tiles.features(tile))
                f.sub_(k_offsets[:, tile]).exp_()
                # context = (features + eps)ᵀ @ [v | 1]
                ge = torch.bmm(tiles.v_ones(tile, vb), grad_context.transpose(1, 2), out=tiles.scratch(tile)).mul_(f)
                _exponent_grad_to_data(ge, kb[:, tile], projection_ones, tiles.data(tile), grad_k[bi, :, tile])
                grad_v[bi, :, tile] = torch.baddbmm(grad_v_eps, f, grad_context[..., :e])
        return grad_q, grad_k, grad_v, None, None


class _Tiles:
    """Row ranges of n genes sized so that an (h, rows, m) tile holds FUSED_TILE_ELEMENTS, and reusable buffers.

    Each buffer is flat storage viewed as a contiguous (h, rows_in_tile, width) tensor, so GEMMs can write into it.
    """

    def __init__(self, like: Tensor, n: int, m: int, e: int, d: int):
        h = like.shape[1]
        self.h, self.n, self.m, self.e, self.d = h, n, m, e, d
        self.rows = max(1, min(n, FUSED_TILE_ELEMENTS // (h * m)))
        size = h * self.rows
        self._features, self._scratch = like.new_empty(size * m), like.new_empty(size * m)
        self._numerator, self._v_ones = like.new_empty(size * (e + 1)), like.new_empty(size * (e + 1))
        self._data = like.new_empty(size * (d + 1))

    def __iter__(self):
        return (slice(start, min(start + self.rows, self.n)) for start in range(0, self.n, self.rows))

    def _view(self, storage: Tensor, tile: slice, width: int) -> Tensor:
        t = tile.stop - tile.start
        return storage[: self.h * t * width].view(self.h, t, width)

    def features(self, tile: slice) -> Tensor:
        return self._view(self._features, tile, self.m)

    def scratch(self, tile: slice) -> Tensor:
        return self._view(self._scratch, tile, self.m)

    def numerator(self, tile: slice) -> Tensor:
        return self._view(self._numerator, tile, self.e + 1)

    def data(self, tile: slice) -> Tensor:
        return self._view(self._data, tile, self.d + 1)

    def v_ones(self, tile: slice, v: Tensor) -> Tensor:
        """[v | 1] of the tile's rows of v (h, n, e): one GEMM with it gives K'ᵀv and the key sums."""
        v_ones = self._view(self._v_ones, tile, self.e + 1)
        v_ones[..., : self.e].copy_(v[:, tile])
        v_ones[..., self.e :].fill_(1.0)
        return v_ones


def _half_sq_norms(data: Tensor) -> Tensor:
    """|x|²/(2√d) per row of (..., n, d) data: the offset of the softmax-kernel exponent, (..., n, 1)."""
    return torch.linalg.vector_norm(data, dim=-1, keepdim=True).square_().mul_(data.shape[-1] ** -0.5 / 2)


def _query_features(data: Tensor, projection: Tensor, offsets: Tensor, out: Tensor) -> Tensor:
    """exp(x·w' - |x|²/(2√d) - max_row x·w') of a tile of query rows (h, t, d), in place in `out` (h, t, m)."""
    h, _, d = data.shape
    torch.bmm(data, projection.T.expand(h, d, projection.shape[0]), out=out)
    return out.sub_(out.amax(dim=-1, keepdim=True).add_(offsets)).exp_()


def _exponent_grad_to_data(grad_exponent: Tensor, data: Tensor, projection_ones: Tensor, buffer: Tensor,
                           out: Tensor) -> None:
    """d loss / d x of the exponent x·w' - |x|²/(2√d), given d loss / d exponent (h, t, m), into `out` (h, t, d)."""
    d = data.shape[-1]
    torch.bmm(grad_exponent, projection_ones, out=buffer)  # (h, t, d+1): through w', and the row sums
    torch.mul(data, buffer[..., d:], out=out)
    out.mul_(-(d**-0.5)).add_(buffer[..., :d])


def _favor_tiled_forward(
    q: Tensor, k: Tensor, v: Tensor, projection: Tensor, feature_eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output (b, h, n, e) plus what the backward needs: contexts (b, h, m, e+1), key maxima (b, h), denominators.

    Keys first: each tile's features go straight into K'ᵀ[v 1]. The keys' stabiliser is their maximum over the
    whole head, known only at the end, so the context is kept relative to the running maximum and rescaled
    whenever it grows (exact up to rounding). Then each query tile is exponentiated and multiplied out.
    """
    # q, k, v (b, h, n, d) of any strides; projection (m, d), already scaled by d^-1/4
    b, h, n, d = q.shape
    e, m = v.shape[-1], projection.shape[0]
    tiles = _Tiles(q, n, m, e, d)
    out = q.new_empty(b, n, h, e).transpose(1, 2)  # (b, h, n, e), stored as (b, n, h, e): merging heads is a view
    contexts, key_maxima = q.new_empty(b, h, m, e + 1), q.new_empty(b, h)
    denominators = q.new_empty(b, h, n, 1)
    for bi in range(b):
        qb, kb, vb = q[bi], k[bi], v[bi]  # (h, n, d)
        context = contexts[bi].zero_()  # (h, m, e+1)
        running_max = q.new_full((h, 1, 1), -math.inf)
        k_offsets = _half_sq_norms(kb)
        for tile in tiles:
            f = torch.bmm(kb[:, tile], projection.T.expand(h, d, m), out=tiles.features(tile))
            new_max = torch.maximum(running_max, f.amax(dim=(-2, -1), keepdim=True))
            context.mul_((running_max - new_max).exp_())
            running_max = new_max
            f.sub_(k_offsets[:, tile] + running_max).exp_()
            context.baddbmm_(f.transpose(1, 2), tiles.v_ones(tile, vb))
        key_maxima[bi] = running_max.view(h)
        if feature_eps:
            context[..., :e].add_(vb.sum(dim=1, keepdim=True), alpha=feature_eps)
            context[..., e:].add_(feature_eps * n)
        context_eps = context.sum(dim=1, keepdim=True).mul_(feature_eps)  # (h, 1, e+1): the queries' +eps
        q_offsets = _half_sq_norms(qb)
        for tile in tiles:
            f = _query_features(qb[:, tile], projection, q_offsets[:, tile], tiles.features(tile))
            num = torch.baddbmm(context_eps, f, context, out=tiles.numerator(tile))  # last column: denominators
            torch.div(num[..., :e], num[..., e:], out=out[bi, :, tile])
            denominators[bi, :, tile] = num[..., e:]
    return out, contexts, key_maxima, denominators


def favor_softmax_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, feature_eps: float) -> Tensor:
    """`linear_attention(softmax_kernel(q), softmax_kernel(k), v, feature_eps)` computed tile by tile (CPU).

    q, k, v (b, h, n, d) of any strides; projection (m, d) -> (b, h, n, e), laid out in memory as (b, n, h, e) so
    that merging the heads afterwards is a view. Elsewhere than on the CPU the unfused functions run: there the
    batched kernels are fast and a Python loop over tiles is not.
    """
    if q.device.type != "cpu":
        q_feat = softmax_kernel(q, projection, is_query=True)
        k_feat = softmax_kernel(k, projection, is_query=False)
        return linear_attention(q_feat, k_feat, v, feature_eps=feature_eps)
    projection = projection * q.shape[-1] ** -0.25
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _FavorSoftmaxAttention.apply(q, k, v, projection, feature_eps)
    return _favor_tiled_forward(q, k, v, projection, feature_eps)[0]


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
