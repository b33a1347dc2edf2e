"""Triton kernels for BSA. Each module names the reference function (reference.py) it must equal."""
from __future__ import annotations


def bsa_triton(q, k, v, pos, tree, cfg, *, sigma, gates, k_cmp=None, v_cmp=None, cmp_mask=None):
    r"""Full BSA through the Triton kernels (the compression/selection kernels are not written yet)."""
    raise NotImplementedError("backend='triton' for the full BSA op is not implemented yet; "
                              "use backend='torch' (the ball branch alone is in kernels.ball)")
