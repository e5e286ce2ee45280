"""ModelNet40 (modelnet40_normal_resampled): writer -> reader -> cache, and the synthetic set."""

import json

import numpy as np
import pytest
import torch

from cd2p.data.classification import PointClassificationDataset, load_classification_cache
from cd2p.data.common import read_shape_txt
from cd2p.data.modelnet40 import prepare_modelnet40, read_modelnet40_index, write_modelnet40
from cd2p.data.synthetic_shapes import PRIMITIVES, synthetic_modelnet40
from cd2p.ops import farthest_point_sample

CLASSES = ["airplane", "night_stand", "cup"]  # night_stand: a class with an underscore


def _shape(rng, n=300, offset=0.0):
    xyz = rng.normal(size=(n, 3)) * [1.0, 0.5, 2.0] + offset
    normals = rng.normal(size=(n, 3))
    return np.concatenate([xyz, normals / np.linalg.norm(normals, axis=1, keepdims=True)], 1)


@pytest.fixture
def raw(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        "train": [("airplane", _shape(rng)), ("night_stand", _shape(rng, 280, 3.0)),
                  ("cup", _shape(rng)), ("night_stand", _shape(rng))],
        "test": [("cup", _shape(rng, 310)), ("airplane", _shape(rng))],
    }  # fmt: skip
    return write_modelnet40(tmp_path / "raw", CLASSES, splits), splits


def test_reader_reads_what_the_writer_wrote(raw):
    root, splits = raw
    names, shapes = read_modelnet40_index(root, "train")
    assert names == CLASSES
    assert [s[0] for s in shapes] == [
        "airplane_0001", "night_stand_0001", "cup_0001", "night_stand_0002"
    ]  # fmt: skip
    assert [s[1] for s in shapes] == [0, 1, 2, 1]
    _, test = read_modelnet40_index(root, "test")
    assert [s[0] for s in test] == ["cup_0002", "airplane_0002"]  # numbered across splits
    table = read_shape_txt(shapes[1][2])
    assert table.shape == (280, 6)
    np.testing.assert_allclose(table, splits["train"][1][1], atol=1e-5)
    assert "night_stand/night_stand_0001.txt" in (root / "filelist.txt").read_text()


def test_reader_errors_name_the_file(raw, tmp_path):
    root, _ = raw
    bad = root / "cup" / "cup_0001.txt"
    bad.write_text("1,2,3,4,5\n")
    with pytest.raises(ValueError, match=r"cup_0001\.txt: expected 6 numbers a line"):
        read_shape_txt(bad)
    with pytest.raises(FileNotFoundError, match="modelnet40_shape_names.txt"):
        read_modelnet40_index(tmp_path, "train")


def test_cache_holds_normalised_fps_ordered_clouds(raw, tmp_path):
    root, splits = raw
    out = prepare_modelnet40(root, tmp_path / "prep", num_points=128, show_progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "cd2p-classification" and meta["class_names"] == CLASSES
    train = load_classification_cache(out, "train")
    assert train.points.shape == (4, 128, 3) and train.labels.tolist() == [0, 1, 2, 1]
    assert train.shape_ids[1] == "night_stand_0001"
    radius = train.points.norm(dim=-1).amax(1)
    torch.testing.assert_close(radius, torch.ones(4))
    torch.testing.assert_close(train.points.mean(1), torch.zeros(4, 3), atol=1e-5, rtol=0)
    # FPS order: the first k stored points are what FPS picks first among them.
    idx = farthest_point_sample(train.points, 16)
    assert torch.equal(idx, torch.arange(16).expand(4, -1))
    # The stored points are points of the original shape up to the normalisation. FPS starts
    # at point 0 and then takes the point farthest from it, which fixes the scale and shift.
    original = torch.from_numpy(splits["train"][0][1][:, :3]).float()
    stored = train.points[0]
    far = original[(original - original[0]).norm(dim=1).argmax()]
    r = (original[0] - far).norm() / (stored[0] - stored[1]).norm()
    restored = stored * r + (original[0] - r * stored[0])
    assert (restored[:, None] - original[None]).norm(dim=-1).amin(1).max() < 1e-4
    dataset = PointClassificationDataset(load_classification_cache(out, "test"), 64)
    item = dataset[0]
    assert item["points"].shape == (64, 3) and int(item["label"]) == 2
    with pytest.raises(ValueError, match="cache holds 128"):
        PointClassificationDataset(train, 256)


def test_prepare_never_leaves_half_a_cache(raw, tmp_path):
    root, _ = raw
    (root / "cup" / "cup_0002.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"cup_0002\.txt"):
        prepare_modelnet40(root, tmp_path / "prep", num_points=64, show_progress=False)
    assert not (tmp_path / "prep").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary directory left


def test_prepare_refuses_to_overwrite_unless_asked(raw, tmp_path):
    root, _ = raw
    out = prepare_modelnet40(root, tmp_path / "prep", num_points=32, show_progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_modelnet40(root, out, num_points=64, show_progress=False)
    prepare_modelnet40(root, out, num_points=64, overwrite=True, show_progress=False)
    assert load_classification_cache(out, "train").points.shape[1] == 64


def test_synthetic_primitives_are_written_in_the_modelnet_format(tmp_path):
    root = synthetic_modelnet40(tmp_path / "syn", num_classes=4, train_per_class=2,
                                test_per_class=1, num_points=200, show_progress=False)  # fmt: skip
    names, shapes = read_modelnet40_index(root, "train")
    assert names == list(PRIMITIVES)[:4]
    assert sorted(s[1] for s in shapes) == [0, 0, 1, 1, 2, 2, 3, 3]
    table = read_shape_txt(shapes[0][2])
    assert table.shape == (200, 6)
    np.testing.assert_allclose(np.linalg.norm(table[:, 3:], axis=1), 1.0, atol=1e-4)
    # Random deformations: two shapes of one class differ.
    a, b = (read_shape_txt(s[2]) for s in shapes if s[1] == 0)
    assert not np.allclose(np.sort(a[:, 1]), np.sort(b[:, 1]))
