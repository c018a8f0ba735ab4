"""The Performer encoder over binned gene expression (scBERT's PerformerLM without its language-model output)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import FastAttention, SelfAttention

GENE_EMBEDDINGS = ("learned", "gene2vec", "none")


@dataclass
class PerformerConfig:
    """Everything needed to rebuild the encoder; stored in checkpoints as a plain dict."""

    num_tokens: int  # expression bins + 2 (scBERT: bin_num + 2)
    max_seq_len: int  # genes + 1 appended token
    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    nb_features: int | None = None
    feature_redraw_interval: int | None = 1000
    generalized_attention: bool = False
    local_attn_heads: int = 0
    local_window_size: int = 256
    ff_mult: int = 4
    ff_glu: bool = False
    ff_chunks: int = 1
    emb_dropout: float = 0.0
    ff_dropout: float = 0.0
    attn_dropout: float = 0.0
    gene_embedding: str = "learned"
    qkv_bias: bool = False
    attn_out_bias: bool = True
    redraw_seed: int = 0
    # Recompute each block's activations during backward instead of keeping them (training only): about a third
    # more time for a fraction of the activation memory. A runtime choice, so older checkpoints simply lack it.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.gene_embedding not in GENE_EMBEDDINGS:
            raise ValueError(f"gene_embedding must be one of {GENE_EMBEDDINGS}, got {self.gene_embedding!r}")
        for name in ("num_tokens", "max_seq_len", "dim", "depth", "heads", "dim_head", "ff_mult", "ff_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


class FeedForward(nn.Module):
    """Position-wise MLP (GELU, optional GLU), optionally run in chunks along genes to cap activation memory."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, glu: bool = False, chunks: int = 1):
        super().__init__()
        self.glu = glu
        self.chunks = chunks
        self.w1 = nn.Linear(dim, dim * mult * (2 if glu else 1))
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def _forward(self, x: Tensor) -> Tensor:
        if self.glu:
            x, gate = self.w1(x).chunk(2, dim=-1)
            x = self.act(x) * gate
        else:
            x = self.act(self.w1(x))
        return self.w2(self.dropout(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.chunks == 1:
            return self._forward(x)
        return torch.cat([self._forward(part) for part in x.chunk(self.chunks, dim=1)], dim=1)


class PerformerBlock(nn.Module):
    """Pre-LayerNorm residual block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: PerformerConfig, local_heads: int):
        super().__init__()
        c = config
        self.attn_norm = nn.LayerNorm(c.dim)
        self.attn = SelfAttention(
            c.dim,
            c.heads,
            c.dim_head,
            nb_features=c.nb_features,
            generalized_attention=c.generalized_attention,
            local_heads=local_heads,
            local_window_size=c.local_window_size,
            dropout=c.attn_dropout,
            qkv_bias=c.qkv_bias,
            out_bias=c.attn_out_bias,
        )
        self.ff_norm = nn.LayerNorm(c.dim)
        self.ff = FeedForward(c.dim, c.ff_mult, c.ff_dropout, c.ff_glu, c.ff_chunks)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class PerformerLM(nn.Module):
    """Token (expression bin) + gene embeddings -> Performer blocks -> LayerNorm; returns per-gene encodings.

    tokens (batch, genes+1) long -> encodings (batch, genes+1, dim).
    """

    def __init__(self, config: PerformerConfig, gene_vectors: Tensor | None = None):
        super().__init__()
        c = self.config = config
        self.token_emb = nn.Embedding(c.num_tokens, c.dim)
        self.gene_emb = None
        if c.gene_embedding != "none":
            self.gene_emb = nn.Embedding(c.max_seq_len, c.dim)
        if c.gene_embedding == "gene2vec":
            if gene_vectors is None:
                gene_vectors = torch.zeros(c.max_seq_len, c.dim)  # filled by load_state_dict when rebuilding
            if tuple(gene_vectors.shape) != (c.max_seq_len, c.dim):
                raise ValueError(
                    f"gene vectors have shape {tuple(gene_vectors.shape)}, expected ({c.max_seq_len}, {c.dim})"
                )
            self.gene_emb.weight.data.copy_(gene_vectors)
            # Frozen like scBERT's gene2vec embedding: it carries prior knowledge, not something to fit per dataset.
            self.gene_emb.weight.requires_grad_(False)
        self.dropout = nn.Dropout(c.emb_dropout)
        self.layers = nn.ModuleList(PerformerBlock(c, c.local_attn_heads) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.feature_redraw_interval = c.feature_redraw_interval
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_redraws", torch.zeros((), dtype=torch.long))
        self._redraws_this_process = 0  # a Python count (no device sync) that checkpointed blocks compare

    def fast_attentions(self) -> list[FastAttention]:
        return [m for m in self.modules() if isinstance(m, FastAttention)]

    @torch.no_grad()
    def redraw_projections(self) -> None:
        """Draw new random features for every layer from a generator seeded by (redraw_seed, redraw count).

        Seeding from the model's own state, not the global RNG, gives every DDP rank the same projections and
        makes a resumed run redraw exactly what the uninterrupted run would have drawn.
        """
        self.num_redraws += 1
        self._redraws_this_process += 1
        for layer_index, attention in enumerate(self.fast_attentions()):
            seed = (self.config.redraw_seed * 1_000_003 + int(self.num_redraws)) * 1009 + layer_index
            attention.redraw(torch.Generator().manual_seed(seed))
        self.calls_since_redraw.zero_()

    def fix_projections(self) -> None:
        """Never redraw again (e.g. for evaluation or to fine-tune with fixed features)."""
        self.feature_redraw_interval = None

    def _maybe_redraw(self) -> None:
        if not self.training or self.feature_redraw_interval is None:
            return
        if self.calls_since_redraw >= self.feature_redraw_interval:
            self.redraw_projections()
        else:
            self.calls_since_redraw += 1

    def _checked_block(self, layer: PerformerBlock, x: Tensor, redraws: int) -> Tensor:
        # The recomputation in backward must see the projections the forward saw. A redraw in between (a second
        # training forward before this backward) would make it silently differentiate other features than the
        # plain path does, so refuse instead.
        if redraws != self._redraws_this_process:
            raise RuntimeError(
                "the FAVOR+ projections were redrawn between a checkpointed forward and its backward; "
                "call backward before the next training forward"
            )
        return layer(x)

    def _block(self, layer: PerformerBlock, x: Tensor) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Dropout replays identically: checkpoint restores the RNG state before recomputing.
            return checkpoint(self._checked_block, layer, x, self._redraws_this_process, use_reentrant=False)
        return layer(x)

    def forward(self, tokens: Tensor) -> Tensor:
        self._maybe_redraw()  # before any block, so never inside a checkpoint's recomputed region
        x = self.token_emb(tokens)  # (batch, genes+1, dim)
        if self.gene_emb is not None:
            x = x + self.gene_emb.weight[: tokens.shape[1]]
        x = self.dropout(x)
        # Frozen leading blocks (scBERT trains only the last) keep no activations without help: tokens are
        # integers, so until the first trainable parameter nothing requires grad and autograd records nothing.
        for layer in self.layers:
            x = self._block(layer, x)
        return self.norm(x)
