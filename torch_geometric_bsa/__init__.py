"""Ball Sparse Attention (BSA, arXiv 2506.12541) for PyTorch Geometric."""
from .balltree import BallTree, build_ball_tree
from .reference import BSAConfig
from .functional import bsa_attention, ball_attention

__version__ = "0.1.0"

__all__ = ["BallTree", "build_ball_tree", "BSAConfig", "bsa_attention", "ball_attention",
           "BSAConv", "BSATransformer", "BSAGPSConv", "__version__"]


def __getattr__(name):
    # nn modules import torch_geometric; load them lazily so `import torch_geometric_bsa` stays cheap
    if name in ("BSAConv", "BSATransformer", "BSAGPSConv"):
        from . import nn
        return getattr(nn, name)
    raise AttributeError(f"module 'torch_geometric_bsa' has no attribute {name!r}")
