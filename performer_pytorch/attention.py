"""Self-attention modules: FAVOR+ global heads and optional local (windowed) heads."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .kernels import (
    RELU_FEATURE_EPS,
    SOFTMAX_FEATURE_EPS,
    default_nb_features,
    favor_softmax_attention,
    gaussian_orthogonal_random_matrix,
    linear_attention,
    relu_kernel,
)


class FastAttention(nn.Module):
    """FAVOR+ attention over (b, h, n, d) queries, keys and values, holding its random projection as a buffer.

    The projection is part of the state dict, so a saved model evaluates with exactly the features it was trained
    with; it only changes when `redraw` is called.
    """

    def __init__(self, dim_head: int, nb_features: int | None = None, generalized_attention: bool = False):
        super().__init__()
        self.dim_head = dim_head
        self.nb_features = nb_features or default_nb_features(dim_head)
        self.generalized_attention = generalized_attention
        self.register_buffer("projection_matrix", gaussian_orthogonal_random_matrix(self.nb_features, dim_head))

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        fresh = gaussian_orthogonal_random_matrix(self.nb_features, self.dim_head, generator=generator)
        self.projection_matrix.copy_(fresh)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # exp() and the division in linear attention lose too much in half precision: run this part in fp32.
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            projection = self.projection_matrix.float()
            if self.generalized_attention:
                q_feat, k_feat = relu_kernel(q, projection), relu_kernel(k, projection)
                return linear_attention(q_feat, k_feat, v, feature_eps=RELU_FEATURE_EPS)
            return favor_softmax_attention(q, k, v, projection, SOFTMAX_FEATURE_EPS)


class SelfAttention(nn.Module):
    """Multi-head self-attention: the first `heads - local_heads` heads use FAVOR+, the rest windowed softmax."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        *,
        nb_features: int | None = None,
        generalized_attention: bool = False,
        local_heads: int = 0,
        local_window_size: int = 256,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        out_bias: bool = True,
    ):
        super().__init__()
        if not 0 <= local_heads <= heads:
            raise ValueError(f"local_heads must be between 0 and heads ({heads}), got {local_heads}")
        self.heads = heads
        self.global_heads = heads - local_heads
        inner_dim = heads * dim_head
        # One fused projection for q, k and v: a single GEMM instead of three.
        self.to_qkv = nn.Linear(dim, 3 * inner_dim, bias=qkv_bias)
        self.to_out = nn.Linear(inner_dim, dim, bias=out_bias)
        self.fast_attention = FastAttention(dim_head, nb_features, generalized_attention)
        self.local_attn = None
        if local_heads:
            from local_attention import LocalAttention  # optional dependency, only needed for local heads

            self.local_attn = LocalAttention(
                window_size=local_window_size,
                causal=False,
                autopad=True,
                dropout=dropout,
                look_forward=1,
                rel_pos_emb_config=(dim_head, local_heads),
            )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # x: (b, n, dim)
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        g = self.global_heads
        outputs = []
        if g:
            outputs.append(self.fast_attention(q[:, :g], k[:, :g], v[:, :g]))
        if self.local_attn is not None:
            outputs.append(self.local_attn(q[:, g:], k[:, g:], v[:, g:]).to(v.dtype))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        out = rearrange(out.to(x.dtype), "b h n d -> b n (h d)")
        return self.dropout(self.to_out(out))
