import pytest

from torch_geometric_bsa.flops import bsa_flops, full_attention_flops, model_flops
from torch_geometric_bsa.reference import BSAConfig


def test_branch_counts():
    cfg = BSAConfig()
    f = bsa_flops(65536, cfg, heads=8, head_dim=64)
    full = full_attention_flops(65536, 8, 64)
    assert f["cmp"] == pytest.approx(full / 8)  # per-query compression over blocks of 8
    assert f["ball"] == pytest.approx(full * 256 / 65536)
    assert f["slc"] == pytest.approx(full * 128 / 65536)
    g = bsa_flops(65536, cfg.with_(group_compression=True), heads=8, head_dim=64)
    assert g["cmp"] == pytest.approx(f["cmp"] / 8)
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))


def test_model_flops_bsa_cheaper_than_full_at_scale():
    full = model_flops(65536, 64, 4, 8, "full")
    bsa = model_flops(65536, 64, 4, 8, "bsa")
    assert bsa["total"] < full["total"] / 5
    assert model_flops(100, 64, 4, 8, "ball")["attention"] > 0
    with pytest.raises(ValueError):
        model_flops(100, 64, 4, 8, "none")
