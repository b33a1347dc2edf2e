"""Installs anywhere: triton is optional. Without it the package imports, the PyTorch path runs, and
backend="triton" fails early with a message that says how to get it (setup.cfg keeps triton out of
install_requires)."""
import configparser
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_is_not_a_hard_requirement():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    required = cfg["options"]["install_requires"]
    assert "triton" not in required
    extras = cfg["options.extras_require"]
    assert "triton" in extras["triton"] and "triton" in extras["test"]


def test_package_works_without_triton():
    # sys.modules["triton"] = None makes every `import triton` raise ImportError, as on macOS/Windows
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None
        import torch
        from torch_geometric_bsa import BSAConv, BSATransformer, BSAConfig, bsa_attention, build_ball_tree
        from torch_geometric_bsa.functional import triton_available
        assert not triton_available(torch.device("cpu"))
        torch.manual_seed(0)
        x, pos = torch.randn(100, 16), torch.rand(100, 3)
        for backend in ("auto", "torch"):
            conv = BSAConv(16, 8, heads=2, ball_size=32, cmp_block=4, slc_block=4, topk=2, group_size=4,
                           backend=backend)
            y = conv(x, pos)
            y.sum().backward()
            assert y.shape == (100, 8) and torch.isfinite(y).all()
        model = BSATransformer(16, 1, hidden_channels=16, num_layers=1, heads=2, ball_size=32, cmp_block=4,
                               slc_block=4, topk=2, group_size=4)
        assert model(x, pos).shape == (100, 1)
        try:
            BSAConv(16, heads=2, backend="triton")
        except ImportError as e:
            assert "triton" in str(e) and "backend='torch'" in str(e), e
        else:
            raise AssertionError("BSAConv(backend='triton') without triton did not raise")
        tree = build_ball_tree(pos, None, 32)
        q = k = v = torch.randn(tree.num_slots, 2, 8)
        try:
            bsa_attention(q, k, v, tree.to_tree(pos), tree, BSAConfig(32, 4, None, 4, 2, 4),
                          sigma=torch.zeros(2), gates=torch.ones(tree.num_slots, 2, 3), backend="triton")
        except ImportError as e:
            assert "not installed" in str(e), e
        else:
            raise AssertionError("bsa_attention(backend='triton') without triton did not raise")
        assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]
