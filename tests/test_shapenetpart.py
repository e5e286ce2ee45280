"""ShapeNetPart: writer -> reader -> cache, the part dataset, and the synthetic composites."""

import json

import numpy as np
import pytest
import torch

from cd2p.data.shapenetpart import (
    STANDARD_PARTS,
    PartSegDataset,
    load_partseg_cache,
    prepare_shapenetpart,
    read_categories,
    read_part_shape,
    read_split_list,
    write_shapenetpart,
)
from cd2p.data.synthetic_shapes import COMPOSITES, synthetic_shapenetpart

CATS = [("Mug", "03797390"), ("Lamp", "03636649"), ("Widget", "09999999")]  # Widget: custom


def _shape(rng, n, parts):
    xyz = rng.normal(size=(n, 3)) + 5.0
    normals = rng.normal(size=(n, 3))
    return np.concatenate([xyz, normals], 1), rng.choice(parts, n)


@pytest.fixture
def raw(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        "train": [("03797390", "m1", *_shape(rng, 50, [36, 37])),
                  ("03636649", "l1", *_shape(rng, 40, [24, 25, 26])),
                  ("09999999", "w1", *_shape(rng, 30, [60, 62]))],
        "val": [("03797390", "m2", *_shape(rng, 20, [36]))],
        "test": [("03636649", "l2", *_shape(rng, 25, [24, 27])),
                 ("09999999", "w2", *_shape(rng, 35, [61, 62]))],
    }  # fmt: skip
    return write_shapenetpart(tmp_path / "raw", CATS, splits), splits


def test_reader_reads_what_the_writer_wrote(raw):
    root, splits = raw
    assert read_categories(root) == CATS
    assert read_split_list(root, "test") == [("03636649", "l2"), ("09999999", "w2")]
    entries = json.loads((root / "train_test_split" / "shuffled_train_file_list.json").read_text())
    assert entries[0] == "shape_data/03797390/m1"
    points, parts = read_part_shape(root / "03636649" / "l1.txt")
    np.testing.assert_allclose(points, splits["train"][1][2], atol=1e-5)
    np.testing.assert_array_equal(parts, splits["train"][1][3])


def test_reader_errors_name_the_file(raw):
    root, _ = raw
    (root / "03797390" / "m1.txt").write_text("0 0 0 0 0 1 2.5\n")
    with pytest.raises(ValueError, match=r"m1\.txt: the 7th column must hold .*part ids"):
        read_part_shape(root / "03797390" / "m1.txt")
    (root / "synsetoffset2category.txt").write_text("Mug\n")
    with pytest.raises(ValueError, match=r"synsetoffset2category\.txt:1"):
        read_categories(root)


def test_cache_keeps_every_point_with_standard_and_custom_parts(raw, tmp_path):
    root, splits = raw
    out = prepare_shapenetpart(root, tmp_path / "prep", show_progress=False)
    train = load_partseg_cache(out, "train")
    assert train.category_names == ["Mug", "Lamp", "Widget"]
    # Standard categories keep the standard table (Lamp part 27 is in no training shape);
    # the custom one gets the parts its shapes use, over every split.
    assert train.category_parts == [[36, 37], [24, 25, 26, 27], [60, 61, 62]]
    assert train.num_parts == 63 and train.num_categories == 3
    assert train.offsets.tolist() == [0, 50, 90, 120] and train.categories.tolist() == [0, 1, 2]
    points, labels = train.shape(1)
    assert labels.tolist() == splits["train"][1][3].tolist()
    torch.testing.assert_close(points.norm(dim=1).max(), torch.tensor(1.0))  # unit sphere
    trainval = load_partseg_cache(out, "trainval")
    assert len(trainval) == 4 and trainval.offsets.tolist() == [0, 50, 90, 120, 140]
    assert trainval.shape(3)[1].tolist() == [36] * 20
    assert trainval.shape_ids[3] == "03797390/m2"


def test_cache_rejects_parts_of_another_category(raw, tmp_path):
    root, _ = raw
    (root / "03797390" / "m2.txt").write_text("0 0 0 0 0 1 12\n1 0 0 0 0 1 36\n")
    with pytest.raises(ValueError, match=r"Mug shapes use parts \[12\]"):
        prepare_shapenetpart(root, tmp_path / "prep", show_progress=False)
    assert not (tmp_path / "prep").exists()


def test_dataset_samples_fixed_points_per_shape(raw, tmp_path):
    root, _ = raw
    data = load_partseg_cache(
        prepare_shapenetpart(root, tmp_path / "p", show_progress=False), "test"
    )
    dataset = PartSegDataset(data, 32, seed=3)
    a, b = dataset[0], dataset[0]
    assert torch.equal(a["points"], b["points"]) and a["points"].shape == (32, 3)
    assert int(a["category"]) == 1 and set(a["part_labels"].tolist()) <= {24, 27}
    # Shape 0 has 25 points: every point once, then repeats to reach 32.
    points, _ = data.shape(0)
    assert torch.unique(a["points"], dim=0).shape[0] == 25
    assert not torch.equal(PartSegDataset(data, 32, seed=4)[0]["points"], a["points"])


def test_synthetic_composites_have_labelled_and_optional_parts(tmp_path):
    root = synthetic_shapenetpart(tmp_path / "syn", train_per_category=6, val_per_category=1,
                                  test_per_category=1, points_range=(150, 200),
                                  show_progress=False)  # fmt: skip
    assert [name for name, _ in read_categories(root)] == list(COMPOSITES)
    data = load_partseg_cache(
        prepare_shapenetpart(root, tmp_path / "p", show_progress=False), "train"
    )
    seen_sets = {name: [] for name in COMPOSITES}
    for i in range(len(data)):
        points, labels = data.shape(i)
        name = data.category_names[int(data.categories[i])]
        assert 150 <= len(points) <= 200
        assert set(labels.tolist()) <= set(STANDARD_PARTS[name])
        seen_sets[name].append(frozenset(labels.tolist()))
    assert len(seen_sets["Chair"][0]) >= 3  # seat, back and legs at least
    # Optional parts (chair arms, engines, bulb, table shelf) are absent from some shapes.
    assert any(len(set(sets)) > 1 for sets in seen_sets.values())
