"""examples/pyg_datasets.py on tiny fakes written in the raw layouts of PyG's ModelNet and ShapeNet, so the
script runs unchanged for a user who has the real files; no download is ever attempted."""
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--points", "64", "--epochs", "2", "--batch-size", "8", "--hidden", "16", "--layers", "1", "--heads", "2",
        "--ball-size", "32", "--topk", "2", "--device", "cpu"]


def _example():
    spec = importlib.util.spec_from_file_location("pyg_datasets_example", os.path.join(ROOT, "examples",
                                                                                       "pyg_datasets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr("torch_geometric.datasets.modelnet.download_url", refuse)
    monkeypatch.setattr("torch_geometric.datasets.shapenet.download_url", refuse)


def write_fake_modelnet(root, per_class=(2, 1)):
    r"""``root/raw/<class>/{train,test}/<class>_NNNN.off``: boxes whose aspect ratio depends on the class."""
    from torch_geometric.datasets import ModelNet
    classes = ModelNet.raw_file_names.fget(None)
    g = torch.Generator().manual_seed(0)
    corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.float)
    faces = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
             (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]
    for c, name in enumerate(classes):
        for split, count in zip(("train", "test"), per_class):
            folder = os.path.join(root, "raw", name, split)
            os.makedirs(folder)
            for i in range(count):
                scale = torch.tensor([1.0, 0.3 + 0.15 * c, 1.0 + 0.1 * c]) * (1 + 0.05 * torch.rand(3, generator=g))
                verts = corners * scale
                lines = ["OFF", f"{len(verts)} {len(faces)} 0"]
                lines += [" ".join(f"{v:.5f}" for v in row) for row in verts.tolist()]
                lines += [f"3 {a} {b} {d}" for a, b, d in faces]
                with open(os.path.join(folder, f"{name}_{i + 1:04d}.off"), "w") as f:
                    f.write("\n".join(lines) + "\n")
    return classes


def write_fake_shapenet(root, category="Airplane", shapes=(4, 2, 2), points=100):
    r"""``root/raw/<category id>/<name>.txt`` (rows ``x y z nx ny nz part``) and
    ``root/raw/train_test_split/shuffled_{train,val,test}_file_list.json``: the layout of
    shapenetcore_partanno_segmentation_benchmark_v0_normal, with every category folder present."""
    from torch_geometric.datasets import ShapeNet
    raw = os.path.join(root, "raw")
    for cid in ShapeNet.category_ids.values():
        os.makedirs(os.path.join(raw, cid))
    os.makedirs(os.path.join(raw, "train_test_split"))
    cid, parts = ShapeNet.category_ids[category], ShapeNet.seg_classes[category]
    g = torch.Generator().manual_seed(1)
    k = 0
    for split, count in zip(("train", "val", "test"), shapes):
        names = []
        for _ in range(count):
            pos = torch.rand(points, 3, generator=g)
            normal = torch.nn.functional.normalize(torch.randn(points, 3, generator=g), dim=1)
            part = torch.tensor(parts)[(pos[:, 2] * len(parts)).long().clamp_max(len(parts) - 1)]
            rows = torch.cat([pos, normal, part[:, None].float()], 1)
            name = f"fake{k:04d}"
            k += 1
            with open(os.path.join(raw, cid, name + ".txt"), "w") as f:
                f.write("\n".join(" ".join(f"{v:.6f}" for v in r) for r in rows.tolist()) + "\n")
            names.append(f"shape_data/{cid}/{name}")
        with open(os.path.join(raw, "train_test_split", f"shuffled_{split}_file_list.json"), "w") as f:
            json.dump(names, f)


def test_modelnet_example_on_a_fake(tmp_path, no_download):
    write_fake_modelnet(str(tmp_path))
    res = _example().main(["modelnet", "--root", str(tmp_path)] + TINY)
    assert 0.0 <= res["accuracy"] <= 1.0
    assert (tmp_path / "processed" / "training.pt").is_file()  # PyG processed our raw files


def test_shapenet_example_on_a_fake(tmp_path, no_download):
    write_fake_shapenet(str(tmp_path))
    res = _example().main(["shapenet", "--root", str(tmp_path), "--category", "Airplane"] + TINY)
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["instance_miou"] <= 1.0


def test_missing_raw_files_are_named_not_downloaded(tmp_path, no_download):
    with pytest.raises(SystemExit, match="ModelNet raw files missing.*bathtub.*--download"):
        _example().main(["modelnet", "--root", str(tmp_path)] + TINY)
    with pytest.raises(SystemExit, match="ShapeNet raw files missing.*train_test_split"):
        _example().main(["shapenet", "--root", str(tmp_path)] + TINY)


def test_shape_iou_by_hand():
    ex = _example()
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    y = torch.tensor([0, 1, 1, 1, 2, 3])
    batch = torch.tensor([0, 0, 0, 0, 1, 1])
    ious = ex.shape_ious(pred, y, batch, torch.tensor([0, 1]), [[0, 1], [2, 3]])
    # shape 0: part 0 IoU 1/2, part 1 IoU 2/3; shape 1: part 2 IoU 1/2, part 3 IoU 0
    assert ious == pytest.approx([(0.5 + 2 / 3) / 2, 0.25])
