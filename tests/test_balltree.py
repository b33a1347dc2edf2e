import pytest
import torch

from torch_geometric_bsa import BallTree, build_ball_tree
from torch_geometric_bsa.balltree import random_rotation

from conftest import random_batch, requires_cuda


def _check_tree(tree: BallTree, pos, batch):
    n, m = pos.size(0), tree.ball_size
    assert tree.num_slots % m == 0 and tree.num_balls == tree.num_slots // m
    # every input point exactly once among valid slots
    assert torch.equal(tree.perm[tree.mask].sort().values, torch.arange(n))
    assert torch.equal(tree.perm[tree.inv], torch.arange(n))
    assert torch.equal(tree.mask, tree.perm >= 0)
    # clouds stay separate and in order; each ball holds one cloud
    assert torch.equal(tree.slot_batch[tree.inv], batch)
    assert bool((tree.slot_batch.view(-1, m) == tree.slot_batch.view(-1, m)[:, :1]).all())
    # padding only at the tail of each cloud's last ball
    counts = torch.bincount(batch, minlength=tree.num_clouds)
    for c in range(tree.num_clouds):
        a, b = int(tree.ptr[c]), int(tree.ptr[c + 1])
        assert (b - a) % m == 0 and 0 <= (b - a) - int(counts[c]) < m
        expect = torch.arange(b - a) < int(counts[c])
        assert torch.equal(tree.mask[a:b], expect)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000])
def test_sizes(n, dim):
    pos, batch = random_batch([n], dim=dim, seed=n)
    tree = build_ball_tree(pos, batch, ball_size=32)
    _check_tree(tree, pos, batch)
    assert tree.num_slots == -(-n // 32) * 32


def test_ragged_batch_and_empty_cloud_index():
    sizes = [5, 64, 65, 300, 1]
    pos, batch = random_batch(sizes, seed=1)
    tree = build_ball_tree(pos, batch, ball_size=64)
    _check_tree(tree, pos, batch)
    assert tree.max_slots == 320
    # a cloud index that never occurs (empty cloud) gets zero slots
    batch2 = batch.clone()
    batch2[batch2 >= 2] += 1
    tree2 = build_ball_tree(pos, batch2, ball_size=64)
    assert int(tree2.ptr[3] - tree2.ptr[2]) == 0
    _check_tree(tree2, pos, batch2)


def test_balls_are_compact():
    pos, batch = random_batch([4096], seed=2)
    tree = build_ball_tree(pos, batch, ball_size=64)
    pos_t = tree.to_tree(pos)
    radius = tree.ball_radii(pos_t).mean()
    cloud_radius = (pos - pos.mean(0)).norm(dim=1).max()
    # 64 balls of a unit cube: ~1/4 of its size; randomly grouped balls would be ~cloud-sized
    rand = BallTree(perm=torch.randperm(4096), mask=torch.ones(4096, dtype=torch.bool), inv=torch.arange(4096),
                    ptr=tree.ptr, slot_batch=tree.slot_batch, counts=tree.counts, ball_size=64, num_balls=64,
                    max_slots=4096)
    rand_radius = rand.ball_radii(pos[rand.perm]).mean()
    assert radius < 0.35 * cloud_radius
    assert radius < 0.4 * rand_radius
    # blocks of 8 inside balls (compression/selection blocks) are compact too (Morton order)
    blocks = pos_t.view(-1, 8, 3)
    block_radius = (blocks - blocks.mean(1, keepdim=True)).norm(dim=-1).amax(1).mean()
    assert block_radius < 0.75 * radius  # 1/8 of the volume: ~0.5 ideal; slabs along one axis give ~0.9


def test_first_split_is_median_on_widest_axis():
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(4 * 16, 3, generator=g) * torch.tensor([1.0, 5.0, 2.0])  # y is widest
    tree = build_ball_tree(pos, ball_size=16)
    y = tree.to_tree(pos)[:, 1]
    assert y[:32].max() <= y[32:].min()
    # second level splits each half on its own widest axis
    for half in (slice(0, 32), slice(32, 64)):
        p = tree.to_tree(pos)[half]
        ax = int((p.max(0).values - p.min(0).values).argmax())
        assert p[:16, ax].max() <= p[16:, ax].min()


def test_deterministic_and_order_independent():
    pos, batch = random_batch([200, 333], seed=4)
    t1, t2 = build_ball_tree(pos, batch, 32), build_ball_tree(pos, batch, 32)
    assert torch.equal(t1.perm, t2.perm)
    # permuting points inside clouds gives the same tree in terms of positions
    perm = torch.cat([torch.randperm(200), 200 + torch.randperm(333)])
    t3 = build_ball_tree(pos[perm], batch, 32)
    assert torch.equal(t3.to_tree(pos[perm]), t1.to_tree(pos))


def test_to_tree_from_tree_roundtrip_and_cat():
    pos, batch = random_batch([70, 20], seed=5)
    tree = build_ball_tree(pos, batch, 32)
    x = torch.randn(90, 4)
    xt = tree.to_tree(x, fill=7.0)
    assert bool((xt[~tree.mask] == 7.0).all())
    assert torch.equal(tree.from_tree(xt), x)
    ta = build_ball_tree(pos[:70], None, 32)
    tb = build_ball_tree(pos[70:], None, 32)
    cat = BallTree.cat([ta, tb])
    for name in ("perm", "mask", "inv", "ptr", "slot_batch", "counts"):
        assert torch.equal(getattr(cat, name), getattr(tree, name)), name


def test_rotated_tree_differs_but_is_valid():
    pos, batch = random_batch([512], seed=6)
    rot = random_rotation(3, torch.Generator().manual_seed(0))
    assert torch.allclose(rot @ rot.T, torch.eye(3), atol=1e-6)
    t = build_ball_tree(pos, batch, 32, rotation=rot)
    _check_tree(t, pos, batch)
    assert not torch.equal(t.perm, build_ball_tree(pos, batch, 32).perm)


@pytest.mark.parametrize("bad, match", [
    (lambda p, b: (p[:, :1], b), "pos must have shape"),
    (lambda p, b: (p.unsqueeze(0), b), "pos must have shape"),
    (lambda p, b: (p[:0], None), "empty"),
    (lambda p, b: (p.masked_fill(torch.rand_like(p) > 0.9, float("nan")), b), "NaN"),
    (lambda p, b: (p.clone().index_fill_(0, torch.tensor([3]), float("inf")), b), "NaN or Inf"),
    (lambda p, b: (p, b.flip(0)), "sorted"),
    (lambda p, b: (p, b[:-1]), "batch must be"),
    (lambda p, b: (p, b.float()), "integer"),
    (lambda p, b: (p.long(), b), "floating-point"),
])
def test_bad_input(bad, match):
    pos, batch = random_batch([10, 10], seed=7)
    p, b = bad(pos, batch)
    with pytest.raises(ValueError, match=match):
        build_ball_tree(p, b, ball_size=8)


def test_bad_ball_size():
    pos, _ = random_batch([10])
    with pytest.raises(ValueError, match="ball_size"):
        build_ball_tree(pos, ball_size=0)


@pytest.mark.parametrize("sizes,m,seed", [([5000, 1, 700, 40000], 64, 11), ([15625] * 8, 256, 8)])
def test_gpu_algorithm_run_on_cpu_agrees_with_cpu_tree(monkeypatch, sizes, m, seed):
    # the GPU build (_tree_order_device: float64 keys, scatter extents) is plain torch and runs on CPU
    # tensors too, so CI checks without a GPU that it builds the same tree as the CPU path (integer
    # keys, host-side nodes); the CUDA test below then only adds the device's own arithmetic
    import torch_geometric_bsa.balltree as B
    pos, batch = random_batch(sizes, seed=seed)
    cpu = build_ball_tree(pos, batch, m)

    def device_algorithm(pos_, counts, m_, n):
        bpc = (counts + m_ - 1) // m_
        ptr = torch.zeros(counts.numel() + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(bpc * m_, 0)
        start = torch.zeros_like(ptr)
        start[1:] = torch.cumsum(counts, 0)
        b = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        return B._tree_order_device(pos_, b, counts, bpc, start, ptr, m_, n, int(bpc.max()), int(bpc.sum()))
    monkeypatch.setattr(B, "_tree_order_host_nodes", device_algorithm)
    dev = build_ball_tree(pos, batch, m)
    assert torch.equal(cpu.ptr, dev.ptr) and torch.equal(cpu.mask, dev.mask)
    # the two break exact ties differently (24-bit quantised vs float64 keys); random data has
    # (almost) none
    assert (cpu.perm == dev.perm).double().mean() > 0.999


@requires_cuda
def test_cuda_tree_agrees_with_cpu_tree():
    # the GPU and CPU builds differ in how they break ties (float64 keys vs 24-bit quantised keys),
    # so they agree on the slots and on almost every point of random data
    pos, batch = random_batch([5000, 1, 700, 40000], seed=11)
    cpu = build_ball_tree(pos, batch, 64)
    gpu = build_ball_tree(pos.cuda(), batch.cuda(), 64)
    perm, mask = gpu.perm.cpu(), gpu.mask.cpu()
    assert torch.equal(perm[mask].sort().values, torch.arange(pos.size(0)))
    assert torch.equal(cpu.ptr, gpu.ptr.cpu()) and torch.equal(cpu.mask, gpu.mask.cpu())
    assert (cpu.perm == gpu.perm.cpu()).double().mean() > 0.99


def test_build_with_layout_equals_plain_build():
    from torch_geometric_bsa.balltree import tree_layout
    pos, batch = random_batch([300, 17, 129], seed=3)
    plain = build_ball_tree(pos, batch, 32)
    layout = tree_layout(batch, 32)
    assert layout == (3, plain.num_slots, plain.max_slots)
    given = build_ball_tree(pos, batch, 32, layout=layout)
    for k in ("perm", "mask", "inv", "ptr", "slot_batch", "counts"):
        assert torch.equal(getattr(plain, k), getattr(given, k)), k
    assert given.cloud_sizes is None and plain.cloud_sizes == (300, 17, 129)
    with pytest.raises(ValueError, match="does not match the batch"):
        build_ball_tree(pos, batch, 32, layout=(3, plain.num_slots + 32, plain.max_slots))
    with pytest.raises(ValueError, match="layout must be"):
        build_ball_tree(pos, batch, 32, layout=(3, plain.num_slots))
    assert tree_layout(None, 32, num_points=100) == (1, 128, 128)
