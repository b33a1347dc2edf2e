"""PyG modules: BSAConv, FullAttentionConv, the BSA transformer and the PointNet / kNN-GNN baselines."""
from .conv import BSAConv, FullAttentionConv, KVCompressor
from .transformer import BSATransformer
from .baselines import KNNGNN, PointNet, knn_graph

__all__ = ["BSAConv", "FullAttentionConv", "KVCompressor", "BSATransformer", "PointNet", "KNNGNN", "knn_graph"]
