"""The reference BSA against naive dense computations written independently here."""
import math

import pytest
import torch

from torch_geometric_bsa import build_ball_tree
from torch_geometric_bsa.reference import (BSAConfig, ball_attention, bsa_reference, compress_mean,
                                           compressed_attention, full_attention, select_blocks,
                                           selected_attention, selection_scores)

from torch_geometric_bsa.reference import _to_dense as R_to_dense
from conftest import random_batch, random_qkv, rel_err

H, D = 2, 8
TOL = 1e-10  # float64 throughout: the reference and the dense forms differ only by rounding


def _setup(sizes, m=16, seed=0, dim=3):
    pos, batch = random_batch(sizes, dim=dim, seed=seed, dtype=torch.float64)
    tree = build_ball_tree(pos, batch, m)
    q, k, v = random_qkv(tree.num_slots, H, D, seed=seed + 1, dtype=torch.float64)
    return pos, batch, tree, tree.to_tree(pos), q, k, v


def _dist(a, b):
    return (a[:, None] - b[None]).norm(dim=-1)


def _dense_attention(q, k, v, allowed, bias=None):
    r"""Softmax attention of every slot over the slots ``allowed[i, j]``; rows with none give 0."""
    logits = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.size(-1))
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~allowed[None], -math.inf)
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", p, v)


def test_ball_branch_vs_dense_block_mask():
    pos, batch, tree, pos_t, q, k, v = _setup([40, 23], m=16)
    sigma = torch.tensor([-0.7, 0.3], dtype=torch.float64)
    out = ball_attention(q, k, v, pos_t, sigma, tree.mask, 16)
    ball = torch.arange(tree.num_slots) // 16
    allowed = (ball[:, None] == ball[None]) & tree.mask[None]
    bias = sigma[:, None, None] * _dist(pos_t, pos_t)[None]
    ref = _dense_attention(q, k, v, allowed, bias) * tree.mask[:, None, None]
    assert rel_err(out, ref) < TOL
    assert bool((out[~tree.mask] == 0).all())


def test_ball_size_above_n_is_full_attention_with_bias():
    pos, batch, tree, pos_t, q, k, v = _setup([50], m=64)
    sigma = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    out = ball_attention(q, k, v, pos_t, sigma, tree.mask, 64)
    # full attention over the valid points, computed in input order
    qi, ki, vi = (tree.from_tree(t) for t in (q, k, v))
    allowed = torch.ones(50, 50, dtype=torch.bool)
    bias = sigma[:, None, None] * _dist(pos, pos)[None]
    ref = _dense_attention(qi, ki, vi, allowed, bias)
    assert rel_err(tree.from_tree(out), ref) < TOL


def _cloud_mask(tree):
    return (tree.slot_batch[:, None] == tree.slot_batch[None]) & tree.mask[None]


def test_full_attention_vs_dense():
    pos, batch, tree, pos_t, q, k, v = _setup([40, 9, 30])
    ref = _dense_attention(q, k, v, _cloud_mask(tree)) * tree.mask[:, None, None]
    assert rel_err(full_attention(q, k, v, tree), ref) < TOL


def test_compression_vs_explicit_pooling():
    pos, batch, tree, pos_t, q, k, v = _setup([40, 30], m=16)
    l = s = 4
    k_cmp, v_cmp, bmask = compress_mean(k, v, tree.mask, tree.slot_batch, l, s)
    # explicit pooled keys with a loop over blocks (tiny sizes)
    kp, vp, valid, bcloud = [], [], [], []
    for b in range(tree.num_slots // s):
        sl = [j for j in range(b * s, b * s + l) if j < tree.num_slots and tree.mask[j]
              and tree.slot_batch[j] == tree.slot_batch[b * s]]
        valid.append(len(sl) > 0)
        bcloud.append(int(tree.slot_batch[b * s]))
        kp.append(k[sl].mean(0) if sl else torch.zeros(H, D, dtype=k.dtype))
        vp.append(v[sl].mean(0) if sl else torch.zeros(H, D, dtype=k.dtype))
    kp, vp = torch.stack(kp), torch.stack(vp)
    assert rel_err(k_cmp[bmask], kp[torch.tensor(valid)]) < TOL
    out = compressed_attention(q, k_cmp, v_cmp, bmask, tree, s)
    allowed = (tree.slot_batch[:, None] == torch.tensor(bcloud)[None]) & torch.tensor(valid)[None]
    ref = _dense_attention(q, kp, vp, allowed) * tree.mask[:, None, None]
    assert rel_err(out, ref) < TOL


def test_compression_with_overlapping_stride():
    pos, batch, tree, pos_t, q, k, v = _setup([37], m=16)
    k_cmp, v_cmp, bmask = compress_mean(k, v, tree.mask, tree.slot_batch, 8, 4)
    assert k_cmp.shape[0] == tree.num_slots // 4
    b = 3  # slots 12..19, all valid in a 37-point cloud
    assert rel_err(k_cmp[b], k[12:20].mean(0)) < TOL
    last = (tree.num_slots // 4) - 1  # slots 44..47 hold padding only
    assert not bool(bmask[last])


def test_selection_with_all_blocks_is_full_attention():
    pos, batch, tree, pos_t, q, k, v = _setup([40, 27], m=16)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=16, group_size=4)  # 16 * 4 >= 48 slots
    k_cmp, v_cmp, bmask = compress_mean(k, v, tree.mask, tree.slot_batch, 4, 4)
    _, p = compressed_attention(q, k_cmp, v_cmp, bmask, tree, 4, return_probs=True)
    idx, ok = select_blocks(selection_scores(p, tree, cfg, 1), cfg.topk)
    out = selected_attention(q, k, v, idx, ok, tree, cfg)
    ref = _dense_attention(q, k, v, _cloud_mask(tree)) * tree.mask[:, None, None]
    assert rel_err(out, ref) < TOL


def test_selection_scores_and_topk_vs_loops():
    pos, batch, tree, pos_t, q, k, v = _setup([64, 40], m=16, seed=3)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=8)
    k_cmp, v_cmp, bmask = compress_mean(k, v, tree.mask, tree.slot_batch, 4, 4)
    _, p = compressed_attention(q, k_cmp, v_cmp, bmask, tree, 4, return_probs=True)
    idx, ok = select_blocks(selection_scores(p, tree, cfg, 1), cfg.topk)
    # naive: per group, probability mass of each of its cloud's blocks, summed over queries and heads
    logits = torch.einsum("ihd,bhd->hib", q, k_cmp) / math.sqrt(D)
    for c in range(tree.num_clouds):
        a, e = int(tree.ptr[c]), int(tree.ptr[c + 1])
        blocks = [b for b in range(a // 4, e // 4) if bmask[b]]
        pr = torch.softmax(logits[:, a:e][:, :, blocks], -1) * tree.mask[a:e, None]
        for gi in range((e - a) // 8):
            mass = pr[:, gi * 8:(gi + 1) * 8].sum((0, 1))
            top = [blocks[j] - a // 4 for j in mass.argsort(descending=True, stable=True)[:3]]
            assert idx[c, gi].tolist() == top
            assert bool(ok[c, gi].all())


def test_per_head_selection_vs_loops():
    # the authors' rule: per head, raw logits summed over the group's queries, own ball excluded
    pos, batch, tree, pos_t, q, k, v = _setup([64, 40], m=16, seed=3)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=8, selection="per_head")
    k_cmp, v_cmp, bmask = compress_mean(k, v, tree.mask, tree.slot_batch, 4, 4)
    _, lg = compressed_attention(q, k_cmp, v_cmp, bmask, tree, 4, return_probs=True, return_logits=True)
    idx, ok = select_blocks(selection_scores(lg, tree, cfg, 1), cfg.topk)          # [B, NG, H, k]
    assert idx.shape == (2, 64 // 8, H, 3)
    logits = torch.einsum("ihd,bhd->hib", q, k_cmp) / math.sqrt(D)
    for c in range(tree.num_clouds):
        a, e = int(tree.ptr[c]), int(tree.ptr[c + 1])
        for gi in range((e - a) // 8):
            ball = (gi * 8) // 16
            blocks = [b for b in range(a // 4, e // 4) if bmask[b] and (b - a // 4) * 4 // 16 != ball]
            rows = [a + gi * 8 + r for r in range(8) if tree.mask[a + gi * 8 + r]]
            for hh in range(H):
                score = logits[hh][rows][:, blocks].sum(0)
                top = [blocks[j] - a // 4 for j in score.argsort(descending=True, stable=True)[:3]]
                assert idx[c, gi, hh].tolist() == top
                assert bool(ok[c, gi, hh].all())


def test_per_head_selection_excludes_own_ball_and_heads_differ():
    pos, batch, tree, pos_t, q, k, v = _setup([64, 40, 9], m=16, seed=4)
    h = q.size(1)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, selection="per_head")
    sigma = -torch.ones(h, dtype=torch.float64)
    gates = torch.ones(tree.num_slots, h, 3, dtype=torch.float64)
    out, br = bsa_reference(q, k, v, pos_t, tree, cfg, sigma=sigma, gates=gates, return_branches=True)
    idx, ok = br["idx"], br["idx_valid"]                                            # [B, NG, H, k]
    group_ball = (torch.arange(idx.size(1)) * cfg.group_size // 16)[None, :, None, None]
    _, gvalid = R_to_dense(tree.slot_batch[::4], tree.ptr, tree.max_slots, 4)   # groups inside a cloud
    own = (idx * 4 // 16 == group_ball) & ok & gvalid[:, :, None, None]
    assert not bool(own.any())                                        # never a block of the own ball
    assert bool(ok[0].all())                                          # 64 points: 3 other balls
    ng2 = int(tree.ptr[3] - tree.ptr[2]) // 4
    assert ng2 == 4 and not bool(ok[2, :ng2].any())  # a cloud of one ball: nothing to pick, branch zero
    assert bool((br["slc"][tree.ptr[2]:] == 0).all())
    assert bool((idx[0, :, 0][ok[0, :, 0]] != idx[0, :, 1][ok[0, :, 1]]).any())  # heads pick differently
    # the shared rule is unchanged: one [B, NG, k] selection, and the own ball may be picked
    shared = cfg.with_(selection="shared")
    _, bs = bsa_reference(q, k, v, pos_t, tree, shared, sigma=sigma, gates=gates, return_branches=True)
    assert bs["idx"].shape == idx.shape[:2] + idx.shape[3:]
    assert bool(((bs["idx"] * 4 // 16 == group_ball[..., 0]) & bs["idx_valid"] & gvalid[..., None]).any())


def test_bsa_gates_select_branches_and_group_compression():
    pos, batch, tree, pos_t, q, k, v = _setup([50, 20], m=16, seed=5)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4)
    sigma = torch.tensor([-0.5, -1.5], dtype=torch.float64)
    gates = torch.rand(tree.num_slots, H, 3, dtype=torch.float64)
    out, br = bsa_reference(q, k, v, pos_t, tree, cfg, sigma=sigma, gates=gates, return_branches=True)
    ref = gates[..., :1] * br["ball"] + gates[..., 1:2] * br["cmp"] + gates[..., 2:] * br["slc"]
    assert rel_err(out, ref) < TOL
    assert rel_err(br["ball"], ball_attention(q, k, v, pos_t, sigma, tree.mask, 16)) < TOL
    assert bool((out[~tree.mask] == 0).all()) and bool(torch.isfinite(out).all())
    # group compression: the compressed branch is one pooled query per group, shared by the group
    gcfg = cfg.with_(group_compression=True)
    _, gbr = bsa_reference(q, k, v, pos_t, tree, gcfg, sigma=sigma, gates=gates, return_branches=True)
    o = gbr["cmp"].view(-1, 4, H, D)
    m = tree.mask.view(-1, 4)
    full_groups = m.all(1)
    assert torch.allclose(o[full_groups], o[full_groups][:, :1].expand_as(o[full_groups]))
    qg = (q.view(-1, 4, H, D) * m[..., None, None]).sum(1) / m.sum(1).clamp_min(1)[:, None, None]
    k_cmp, v_cmp, bmask = compress_mean(k, v, tree.mask, tree.slot_batch, 4, 4)
    gcloud = tree.slot_batch[::4]
    allowed = (gcloud[:, None] == tree.slot_batch[::4][None]) & bmask[None]
    ref_g = _dense_attention(qg, k_cmp, v_cmp, allowed)
    assert rel_err(o[full_groups][:, 0], ref_g[full_groups]) < TOL


def test_clouds_do_not_see_each_other():
    pos, batch, tree, pos_t, q, k, v = _setup([48, 48], m=16, seed=7)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=4, group_size=4)
    sigma = -torch.ones(H, dtype=torch.float64)
    gates = torch.ones(tree.num_slots, H, 3, dtype=torch.float64)
    out = bsa_reference(q, k, v, pos_t, tree, cfg, sigma=sigma, gates=gates)
    k2, v2 = k.clone(), v.clone()
    k2[48:] = torch.randn_like(k2[48:])
    v2[48:] = torch.randn_like(v2[48:])
    out2 = bsa_reference(q, k2, v2, pos_t, tree, cfg, sigma=sigma, gates=gates)
    assert torch.equal(out[:48], out2[:48])
    assert not torch.allclose(out[48:], out2[48:])


@pytest.mark.parametrize("kw, match", [
    (dict(cmp_block=5), "cmp_block=5 must divide"),
    (dict(slc_block=3), "slc_block=3 must divide"),
    (dict(group_size=6), "group_size=6 must divide"),
    (dict(cmp_stride=3), "cmp_stride"),
    (dict(topk=0), "topk"),
    (dict(selection="per-head"), r"selection must be one of \('shared', 'per_head'\), got 'per-head'"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        BSAConfig(ball_size=16, **{"cmp_block": 4, "slc_block": 4, "group_size": 4, **kw})
