"""PyG modules: BSAConv, FullAttentionConv, the BSA transformer, the GPS layer with BSA and the PointNet /
kNN-GNN / PointTransformerConv baselines."""
from .conv import BSAConv, FullAttentionConv, KVCompressor
from .transformer import BSATransformer
from .gps import BSAGPSConv
from .baselines import KNNGNN, PointNet, PointTransformerNet, knn_graph

__all__ = ["BSAConv", "FullAttentionConv", "KVCompressor", "BSATransformer", "BSAGPSConv", "PointNet", "KNNGNN",
           "PointTransformerNet", "knn_graph"]
