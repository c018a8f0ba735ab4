"""A hand-written Performer (FAVOR+ linear attention) encoder for binned gene expression, scBERT-compatible."""

from .attention import FastAttention, SelfAttention
from .kernels import exact_softmax_attention, gaussian_orthogonal_random_matrix, linear_attention, softmax_kernel
from .model import PerformerConfig, PerformerLM
from .scbert import convert_scbert_state_dict, is_scbert_state_dict

__all__ = [
    "FastAttention",
    "PerformerConfig",
    "PerformerLM",
    "SelfAttention",
    "convert_scbert_state_dict",
    "exact_softmax_attention",
    "gaussian_orthogonal_random_matrix",
    "is_scbert_state_dict",
    "linear_attention",
    "softmax_kernel",
]
