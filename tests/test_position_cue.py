"""examples/multibody_position_cue.py: its features and its probe on a cloud where the answer is known."""
import importlib.util
import os

import torch
from torch_geometric.data import Data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("position_cue", os.path.join(ROOT, "examples", "multibody_position_cue.py"))
cue = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cue)


def _cloud(g, n=400):
    # two bodies of n / 2 points; the "interaction" is a function of where the body stands
    body = torch.arange(n) // (n // 2)
    shift = torch.randn(2, 3, generator=g) * 3.0
    pos = torch.randn(n, 3, generator=g) * 0.3 + shift[body]
    normal = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    cp_iso = torch.randn(n, 1, generator=g) * 0.1
    inter = torch.tanh(shift[body, :1])  # per body, from its absolute place only
    y_mean, y_std = torch.tensor([0.2]), torch.tensor([0.5])
    y = (cp_iso + inter - y_mean) / y_std
    return Data(pos=pos, x=normal, y=y, y_mean=y_mean, y_std=y_std, cp_isolated=cp_iso, body=body), inter.view(-1)


def test_features_local_positions_are_centred_and_target_is_the_interaction():
    g = torch.Generator().manual_seed(0)
    data, inter = _cloud(g)
    feats, target = cue.features(data, torch.zeros(3), torch.tensor(2.0))
    assert torch.allclose(target, inter / 0.5, atol=1e-5)  # (cp - cp_isolated) / y_std
    for b in (0, 1):  # relative to the body's own centre: mean zero per body
        assert feats["local"][data.body == b, 3:].mean(0).abs().max() < 1e-5
    assert torch.allclose(feats["absolute"][:, 3:], data.pos / 2.0)
    assert feats["both"].shape == (400, 9) and feats["layout"].shape == (400, 14)
    other = feats["layout"][:, 6:9]  # body 0 sees body 1 at shift1 - shift0 (over the scale), and back
    c0, c1 = (data.pos[data.body == b].mean(0) for b in (0, 1))
    assert torch.allclose(other[data.body == 0], ((c1 - c0) / 2.0).expand(200, 3), atol=1e-5)
    assert (feats["layout"][:, 9] == 1).all() and (feats["layout"][:, 10:] == 0).all()


def test_probe_finds_an_absolute_position_cue_and_not_a_local_one():
    g = torch.Generator().manual_seed(1)
    clouds = [_cloud(g) for _ in range(40)]
    rows = [cue.features(d, torch.zeros(3), torch.tensor(3.0)) for d, _ in clouds]
    x = {k: torch.cat([r[0][k] for r in rows]) for k in rows[0][0]}
    y = torch.cat([r[1] for r in rows])
    tr, te = slice(0, 12000), slice(12000, None)
    var = float(y[te].var())
    torch.set_num_threads(1)
    absolute = cue.fit(x["absolute"][tr], y[tr], x["absolute"][te], y[te], epochs=200, seed=0, hidden=32)
    local = cue.fit(x["local"][tr], y[tr], x["local"][te], y[te], epochs=200, seed=0, hidden=32)
    assert absolute < 0.2 * var < local
