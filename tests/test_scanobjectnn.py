"""ScanObjectNN h5 files: writer -> reader -> per-variant caches."""

import numpy as np
import pytest
import torch

from cd2p.data.classification import load_classification_cache
from cd2p.data.scanobjectnn import (
    SCANOBJECTNN_CLASSES,
    available_variants,
    prepare_scanobjectnn,
    read_scanobjectnn_h5,
    variant_file,
    write_scanobjectnn_h5,
)


def _write_variant(root, variant, rng, sizes=(6, 3), points=64):
    written = {}
    for split, count in zip(("train", "test"), sizes, strict=True):
        clouds = rng.normal(size=(count, points, 3)).astype(np.float32)
        labels = rng.integers(0, 15, count)
        mask = rng.integers(0, 2, (count, points))
        write_scanobjectnn_h5(variant_file(root, variant, split), clouds, labels, mask)
        written[split] = (clouds, labels)
    return written


def test_reader_reads_what_the_writer_wrote(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    written = _write_variant(tmp_path, "hardest", rng)
    path = tmp_path / "main_split" / "training_objectdataset_augmentedrot_scale75.h5"
    assert variant_file(tmp_path, "hardest", "train") == path
    with h5py.File(path) as f:  # the release's layout
        assert sorted(f.keys()) == ["data", "label", "mask"] and f["data"].shape == (6, 64, 3)
    points, labels = read_scanobjectnn_h5(path)
    np.testing.assert_array_equal(points, written["train"][0])
    np.testing.assert_array_equal(labels, written["train"][1])
    assert labels.dtype == np.int64 and len(SCANOBJECTNN_CLASSES) == 15


def test_reader_errors_name_the_file(tmp_path):
    bad = tmp_path / "main_split" / "test_objectdataset.h5"
    write_scanobjectnn_h5(bad, np.zeros((2, 8, 3)), np.array([0, 15]))
    with pytest.raises(ValueError, match=r"test_objectdataset\.h5: labels outside \[0, 15\)"):
        read_scanobjectnn_h5(bad)
    bad.write_bytes(b"not an h5 file")
    with pytest.raises(ValueError, match="not a readable h5 file"):
        read_scanobjectnn_h5(bad)
    with pytest.raises(FileNotFoundError, match="h5_files"):
        read_scanobjectnn_h5(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="variant must be one of objbg, objonly, hardest"):
        variant_file(tmp_path, "pb_t50", "train")


def test_prepare_writes_one_cache_per_variant(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "h5_files"
    written = {v: _write_variant(raw, v, rng) for v in ("objbg", "objonly")}
    assert available_variants(raw) == ["objbg", "objonly"]
    outs = prepare_scanobjectnn(raw, tmp_path / "prep", show_progress=False)
    assert [p.name for p in outs] == ["objbg", "objonly"]
    for variant, splits in written.items():
        for split, (clouds, labels) in splits.items():
            cache = load_classification_cache(tmp_path / "prep" / variant, split)
            assert cache.class_names == list(SCANOBJECTNN_CLASSES)
            assert cache.source == f"scanobjectnn-{variant}"
            assert cache.labels.tolist() == labels.tolist()
            # Only re-ordered (FPS order), not re-normalised: the same set of points.
            for stored, original in zip(cache.points, torch.from_numpy(clouds), strict=True):
                assert torch.equal(
                    stored[torch.argsort(stored[:, 0])], original[torch.argsort(original[:, 0])]
                )
    with pytest.raises(FileNotFoundError, match="no ScanObjectNN h5 files"):
        prepare_scanobjectnn(tmp_path / "prep", tmp_path / "other", show_progress=False)
