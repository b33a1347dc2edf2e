"""Selected-attention kernel (kernels/selected.py) against reference.selected_attention.

Random block selections (with invalid slots, -1), forward and backward; the dK/dV path goes through
the inverted block -> groups index. Tolerances as in test_compressed: fp32 1e-5 / 1e-4, fp16
2e-3 / 5e-3, bf16 1.5e-2 / 3e-2 (bf16 on GPU only).
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch_geometric_bsa.kernels._common as common  # noqa: E402
import torch_geometric_bsa.kernels.selected as slc  # noqa: E402
from torch_geometric_bsa import BSAConfig, build_ball_tree  # noqa: E402
from torch_geometric_bsa import reference as R  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}


from conftest import rel  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py


def check(sizes, cfg, h, d, dtype, seed=0, hot=False, per_head=False):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), 3, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    tree = build_ball_tree(pos.to(DEVICE), batch.to(DEVICE), ball_size=cfg.ball_size)
    n, gs, ls = tree.num_slots, cfg.group_size, cfg.slc_block
    q, k, v = (torch.randn(n, h, d, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    # distinct random local blocks per group (some -1), as the top-k produces them
    ng = n // gs
    cloud = tree.slot_batch[::gs].cpu()
    nblk = ((tree.ptr[1:] - tree.ptr[:-1]) // ls).cpu()[cloud]
    kk = min(cfg.topk, tree.max_slots // ls)
    lead = (ng, h) if per_head else (ng,)  # per_head: one selection per head, [ng, h, kk]
    loc = torch.argsort(torch.rand(*lead, tree.max_slots // ls, generator=g), -1)[..., :kk]
    if hot:  # every group of a cloud picks the same blocks: long lists, cut into chunks in the dK/dV pass
        loc = torch.arange(kk).expand(*lead, kk).flip(-1)
        if per_head:  # head j picks blocks j .. j + kk - 1: heads differ, lists still long
            loc = loc + torch.arange(h)[:, None]
    nb = nblk.view((ng,) + (1,) * len(lead))
    loc = torch.where((loc < nb) & (torch.rand(*lead, kk, generator=g) > 0.15), loc, -1)
    idx = torch.where(loc >= 0, loc + (tree.ptr.cpu()[cloud] // ls).view(nb.shape), -1).int().to(DEVICE)

    o = slc.selected_attention_triton(q, k, v, idx, tree.mask, gs, ls)
    do = torch.randn(o.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    dl, _ = R._to_dense(loc.to(DEVICE), tree.ptr, tree.max_slots, gs)
    ro = R.selected_attention(q64, k64, v64, dl.clamp_min(0), dl >= 0, tree, cfg)
    rgrads = torch.autograd.grad(ro, (q64, k64, v64), do.double())
    tol_o, tol_g = TOL[dtype]
    assert rel(o, ro) < tol_o
    for a, b in zip(grads, rgrads):
        assert rel(a, b) < tol_g
    if hot:  # the chunks' partials are added in a fixed order: bitwise the same gradients again
        again = torch.autograd.grad(slc.selected_attention_triton(q, k, v, idx, tree.mask, gs, ls), (q, k, v), do)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))
    return idx


@pytest.mark.parametrize("hot", [False, True], ids=["random", "hot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selected_per_head_matches_reference(dtype, hot):
    # idx [groups, H, k]: each head reads its own blocks (PER_HEAD), dK/dV invert per (head, block)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, selection="per_head")
    check([50, 90, 20], cfg, h=3, d=16, dtype=dtype, seed=5, hot=hot, per_head=True)


@pytest.mark.parametrize("union", [True, False], ids=["union_walk", "group_tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selected_matches_reference(dtype, union):
    # both forward / dQ layouts: the union walk (the rule's default) and each group's own blocks
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    with common.launch_config("slc_fwd", union=union):
        check([50, 90, 20], cfg, h=2, d=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selected_hot_blocks(dtype):
    # blocks picked by ~20 groups each: their dK/dV lists span several chunks (partials + final pass)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    check([50, 90, 20], cfg, h=2, d=16, dtype=dtype, hot=True, seed=4)


@pytest.mark.parametrize("rows", [4, 128], ids=["one_group_a_tile", "tile_past_the_last_group"])
def test_selected_group_tiles(rows):
    # forward and dQ take several groups per program (rows / group size); 4 rows: one group of 4
    # padded to 16 rows (GT = 1); 128: 32 groups a tile, more than the 48 groups fill in whole
    # tiles (the last tile's groups past the end load nothing and write nothing)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    assert slc._tiles(rows, 32, 4, 3, 4)[2:] == ((16, 1) if rows == 4 else (4, 32))
    with common.launch_config("slc_fwd", group_rows=rows, keys=32, union=False), \
            common.launch_config("slc_dq", group_rows=rows, keys=32):
        check([50, 90, 20], cfg, h=2, d=16, dtype=torch.float32, seed=7)


@pytest.mark.parametrize("hot", [False, True], ids=["random", "hot"])
@pytest.mark.parametrize("rows,keys,fallback", [(16, 16, 0), (32, 64, 0), (128, 32, 0), (32, 64, 4), (32, 64, 8)],
                         ids=["4_groups", "8_groups", "16_groups", "8_groups_fallback_1", "8_groups_fallback_2"])
def test_selected_union_walk(rows, keys, fallback, hot):
    # union=True: a program of GT groups loads each distinct selected block once (``_union_kernel``'s
    # list, several steps of CB blocks), a row keeping the blocks its group picked; random picks
    # (few shared), hot picks (every group of a cloud the same blocks: a tile's list is one group's),
    # 128 rows: 32 groups asked, 16 taken (one bit each), the last tile past the last group.
    # fallback (rows of its programs): the walk leaves out tiles that share less than half, and a
    # second launch runs their groups over their own blocks, one or two groups a program; random
    # picks take both launches
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    assert slc._union_tiles(rows, keys, 4, 3, 4)[3] == min(16, rows // 4)
    with common.launch_config("slc_fwd", rows=rows, keys=keys, union=True, fallback=bool(fallback),
                              group_rows=max(fallback, 1)):
        idx = check([50, 90, 20], cfg, h=2, d=16, dtype=torch.float32, seed=11, hot=hot)
    walk = slc._walk(rows, max(fallback, 1), keys, True, bool(fallback), idx, 4, 4)
    assert len(walk) == (2 if fallback else 1)
    if fallback:
        gt = walk[0][0][3]
        walked = walk[0][1]["UCNT"] * 2 <= gt * 3
        assert bool(walked.all()) if hot else bool(walked.any() and (~walked).any())


def test_union_kernel_lists_distinct_blocks():
    # the tile's distinct blocks in order of first appearance, each with the bits of the groups
    # that picked it; -1 entries and groups past the end take no part
    idx = torch.tensor([[3, 5, -1], [5, 7, 3], [-1, -1, -1], [9, 3, 5], [2, 8, 1]], dtype=torch.int32, device=DEVICE)
    [((_, cb, _, gt), kw)] = slc._walk(16, 16, 16, True, False, idx, 4, 4)
    assert gt == 4 and kw["NE"] == 16
    cnt = kw["UCNT"].cpu().tolist()
    assert cnt == [4, 3]
    u, bits = kw["U"].cpu(), kw["UBITS"].cpu()
    assert u[0, :4].tolist() == [3, 5, 7, 9] and bits[0, :4].tolist() == [0b1011, 0b1011, 0b10, 0b1000]
    assert u[1, :3].tolist() == [2, 8, 1] and bits[1, :3].tolist() == [1, 1, 1]


def test_union_tiles_shapes():
    # (LS_P2, CB, GM, GT, NE): the model's 8 groups of 8; small groups capped at 16 a tile and at
    # 128 entries when top-k allows (the list kernel's NE x NE comparison)
    assert slc._union_tiles(64, 128, 8, 16, 8) == (8, 16, 8, 8, 128)
    assert slc._union_tiles(64, 128, 8, 4, 8) == (8, 16, 8, 8, 32)
    assert slc._union_tiles(64, 128, 8, 16, 4) == (8, 16, 4, 8, 128)
    assert slc._union_tiles(128, 64, 4, 3, 2) == (4, 16, 2, 16, 64)
    assert slc._union_tiles(64, 128, 8, 200, 8) == (8, 16, 8, 1, 256)


def test_group_tiles_shapes():
    # (LS_P2, CB, GM, GT): rows split into groups, keys into blocks per group, >= 16 of each
    assert slc._tiles(64, 256, 8, 4, 8) == (8, 4, 8, 8)    # the model's shape: 8 groups x 4 blocks of 8
    assert slc._tiles(64, 256, 8, 16, 8) == (8, 4, 8, 8)   # top-k 16: four steps of 4 blocks
    assert slc._tiles(16, 32, 4, 3, 4) == (4, 2, 4, 4)
    assert slc._tiles(16, 32, 4, 3, 32) == (4, 4, 32, 1)   # a group larger than the tile: one, unpadded
    assert slc._tiles(8, 16, 8, 5, 2) == (8, 1, 4, 4)      # a lone small group padded to 16 rows


def test_selected_odd_shapes():
    # group of 2 (padded to the 16-row tile), blocks of 8, top-k 5 (not a power of two), D = 24
    cfg = BSAConfig(ball_size=16, cmp_block=8, slc_block=8, topk=5, group_size=2)
    check([70, 33], cfg, h=1, d=24, dtype=torch.float32, seed=2)


@pytest.mark.parametrize("num_blocks", [4, 40000], ids=["int16_keys", "int32_keys"])
def test_invert_selection(num_blocks):
    # block b was picked by the flat entries order[ptr[b]:ptr[b+1]] (group = entry // k), in entry
    # order; -1 entries are never listed
    idx = torch.tensor([[2, 0, -1], [2, 1, 3]], dtype=torch.int32, device=DEVICE)
    ptr, order = slc.invert_selection(idx, num_blocks)
    assert ptr.dtype == torch.int32 and ptr.shape == (num_blocks + 1,)
    assert ptr[:5].tolist() == [1, 2, 3, 5, 6] and (ptr[5:] == 6).all()
    assert order[1:6].tolist() == [1, 4, 0, 3, 5]
    assert (order[1:6] // 3).tolist() == [0, 1, 0, 1, 1]


@pytest.mark.parametrize("num_blocks", [3000, 40000], ids=["int16_keys", "int32_keys"])
def test_invert_selection_pointers_match_searchsorted(num_blocks):
    # the lower-bound kernel against torch.searchsorted on fresh random ids: many -1 entries, long
    # runs of unpicked blocks, blocks past the last entry
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(-1, num_blocks // 3, (1500, 5), generator=g, dtype=torch.int32).to(DEVICE)
    idx[::7] = -1
    ptr, order = slc.invert_selection(idx, num_blocks)
    flat = idx.reshape(-1).long()
    ids, want_order = torch.sort(flat, stable=True)
    want = torch.searchsorted(ids, torch.arange(num_blocks + 1, device=DEVICE), out_int32=True)
    assert torch.equal(ptr, want)
    assert torch.equal(order, want_order)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_selected_gpu_real_size(dtype):
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8)
    check([6000, 9000, 500], cfg, h=8, d=64, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("hot", [False, True], ids=["random", "hot"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selected_per_head_gpu_real_size(dtype, hot):
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8, selection="per_head")
    check([6000, 9000, 500], cfg, h=8, d=64, dtype=dtype, hot=hot, per_head=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("hot", [False, True], ids=["random", "hot"])
@pytest.mark.parametrize("d,topk", [(8, 4), (32, 16), (64, 16)], ids=["paper_layer", "study_layer", "op"])
@pytest.mark.parametrize("fallback", [0, 1], ids=["walk", "walk_and_fallback"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selected_union_gpu_real_size(dtype, d, topk, hot, fallback):
    # the union walk compiled at the model layers' tiles (64 rows, 128 keys); with the fallback
    # launch, random picks (few shared) take it, one group a program
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=topk, group_size=8)
    with common.launch_config("slc_fwd", rows=64, keys=128, union=True, fallback=bool(fallback)):
        check([6000, 9000, 500], cfg, h=4, d=d, dtype=dtype, hot=hot)
