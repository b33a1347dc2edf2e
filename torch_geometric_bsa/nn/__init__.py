"""PyG modules: BSAConv, the dense FullAttentionConv peer and the BSA transformer."""
from .conv import BSAConv, FullAttentionConv, KVCompressor
from .transformer import BSATransformer

__all__ = ["BSAConv", "FullAttentionConv", "KVCompressor", "BSATransformer"]
