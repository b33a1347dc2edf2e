"""One dataset registry: a name added to torch_geometric_bsa.datasets.DATASETS is a --dataset choice of
examples/train.py without touching the script (docs/own-data.md)."""
import importlib.util
import os

import pytest

from torch_geometric_bsa import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_train():
    spec = importlib.util.spec_from_file_location("_example_train_registry", os.path.join(ROOT, "examples", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_script_choices_come_from_the_registry(monkeypatch):
    train = _load_train()
    assert set(datasets.DATASETS) <= set(train.DATASETS)
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--dataset", "my-clouds"])
    monkeypatch.setitem(datasets.DATASETS, "my-clouds", datasets.CarPressure)
    train = _load_train()
    args = train.build_parser().parse_args(["--dataset", "my-clouds"])
    assert args.dataset == "my-clouds"


def test_every_registered_dataset_names_its_target_and_units():
    for name, cls in datasets.DATASETS.items():
        label = getattr(cls, "target_label", "")
        assert "(" in label and ")" in label, f"{name}: target_label {label!r} should give units in brackets"


def test_field_plot_colour_bars_are_labelled(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.colorbar
    labels = []
    orig = matplotlib.colorbar.Colorbar.set_label
    monkeypatch.setattr(matplotlib.colorbar.Colorbar, "set_label",
                        lambda self, label, **kw: (labels.append(label), orig(self, label, **kw))[1])
    train = _load_train()
    train.main(["--dataset", "toy", "--num-train", "2", "--num-test", "1", "--batch-size", "2", "--hidden", "8",
                "--layers", "1", "--heads", "2", "--ball-size", "32", "--cmp-block", "4", "--slc-block", "4",
                "--topk", "2", "--group-size", "4", "--no-progress", "--threads", "1", "--steps", "1",
                "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "field.png").is_file()
    labels = [s for s in labels if s]  # matplotlib sets an empty label when it builds a colour bar
    assert labels == ["target (arbitrary units)", "target (arbitrary units)", "|error|, target (arbitrary units)"]
