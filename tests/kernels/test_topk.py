"""Streamed group top-k (kernels/topk.py) against reference.selection_scores + select_blocks.

Exact index agreement wherever the reference's scores are not (nearly) tied; equal scores go to the
lower block index. Compared in fp32 (scores in the kernel are fp32 sums of exp2 of an exact "ieee"
dot); bf16/fp16 only change which near-ties flip, which test_bsa_triton covers end to end.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch_geometric_bsa.kernels.compressed as cmp  # noqa: E402
import torch_geometric_bsa.kernels.topk as topk  # noqa: E402
from torch_geometric_bsa.kernels import plan  # noqa: E402
from torch_geometric_bsa import BSAConfig, build_ball_tree  # noqa: E402
from torch_geometric_bsa import reference as R  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py


def make_tree(sizes, ball_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), 3, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return build_ball_tree(pos.to(DEVICE), batch.to(DEVICE), ball_size=ball_size)


def local_dense(idx, tree, cfg):
    r"""Kernel output (global block ids per group) -> the reference's dense local layout."""
    g, ls = cfg.group_size, cfg.slc_block
    cloud = tree.slot_batch[::g]
    loc = torch.where(idx >= 0, idx.long() - (tree.ptr[cloud] // ls)[:, None], -1)
    return R._to_dense(loc, tree.ptr, tree.max_slots, g)


def check(sizes, cfg, h, d, seed=0, q_scale=1.0, tie_gap=1e-5):
    tree = make_tree(sizes, cfg.ball_size, seed)
    n, g = tree.num_slots, cfg.group_size
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(n, h, d, generator=gen).to(DEVICE) for _ in range(3))
    q = q * q_scale
    kc, vc, cm = R.compress_mean(k, v, tree.mask, tree.slot_batch, cfg.cmp_block, cfg.cmp_stride)
    if cfg.group_compression:
        w = tree.mask.view(-1, g, 1, 1).float()
        q = (q.view(-1, g, h, d) * w).sum(1) / w.sum(1).clamp_min(1.0)
    q_unit = n // q.size(0)
    ranges = plan.compressed_ranges(tree, q_unit, cfg.cmp_stride)
    _, lse = cmp.compressed_attention_triton(q, kc, vc, cm, ranges, ragged=tree.num_clouds > 1)
    svalid, granges, kk = plan.selection_plan(tree, g, cfg.slc_block, cfg.topk)
    idx = topk.select_topk_triton(q, kc, lse, cm, svalid, ranges[:2], granges, kk)

    _, p = R.compressed_attention(q.double(), kc.double(), vc.double(), cm, tree, cfg.cmp_stride,
                                  return_probs=True)
    scores = R.selection_scores(p, tree, cfg, q_unit)
    ridx, rvalid = R.select_blocks(scores, cfg.topk)
    mine, gvalid = local_dense(idx, tree, cfg)
    ref = torch.where(rvalid, ridx, -1)
    # a group's set is only defined up to ties at the k-th place: compare groups whose k-th and
    # (k+1)-th scores differ, plus every group with fewer valid blocks than k
    srt = scores.sort(-1, descending=True).values
    kk = ridx.size(-1)
    if srt.size(-1) > kk:
        gap = (srt[..., kk - 1] - srt[..., kk]).nan_to_num(posinf=1.0)
        clear = gap.abs() > tie_gap * srt[..., :1].abs().clamp_min(1e-30).squeeze(-1)
        clear |= ~torch.isfinite(srt[..., kk])
    else:
        clear = torch.ones_like(gvalid)
    sel = gvalid & clear
    assert sel.sum() > 0.8 * gvalid.sum()
    # the selected *set* must agree (its order only matters up to near-ties inside the top-k)
    assert torch.equal(mine[sel].sort(-1).values, ref[sel].sort(-1).values)
    # and the order too where consecutive reference scores are clearly apart
    ordered = sel & ((srt[..., :kk - 1] - srt[..., 1:kk]).abs() > tie_gap * srt[..., :1].abs()).all(-1)
    assert torch.equal(mine[ordered], ref[ordered])
    return idx


@pytest.mark.parametrize("group_compression", [False, True])
def test_topk_matches_reference(group_compression):
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=5, group_size=4,
                    group_compression=group_compression)
    check([50, 90, 20], cfg, h=2, d=16)


def test_topk_not_power_of_two_and_more_than_blocks():
    # topk=3 (not a power of two); a cloud of 16 slots has fewer blocks than a bigger cloud's k
    cfg = BSAConfig(ball_size=16, cmp_block=8, slc_block=8, topk=3, group_size=8)
    check([100, 10], cfg, h=2, d=16, seed=5)


def test_topk_more_than_a_key_tile():
    # k = 20 selected of up to 30 blocks: more than the interpreter's 16-key tiles
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=20, group_size=4)
    check([120, 90], cfg, h=2, d=16, seed=9)


def test_topk_ties_go_to_lower_index():
    # q = 0: every valid block of a cloud gets the same score, so the first k valid blocks win
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    idx = check([40, 33], cfg, h=2, d=16, q_scale=0.0, tie_gap=-1.0)
    tree = make_tree([40, 33], 16)
    svalid = tree.mask.view(-1, 4).any(1)
    first = idx[0].long()
    assert torch.equal(first, torch.nonzero(svalid[:16]).flatten()[:3].to(first))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("group_compression", [False, True])
def test_topk_gpu_real_size(group_compression):
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                    group_compression=group_compression)
    check([3000, 9000, 700], cfg, h=8, d=64)
