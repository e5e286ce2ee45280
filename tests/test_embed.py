"""``cd2p embed``: the features it writes are the backbone's pooled outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from datasets import load_from_disk

from cd2p import Cd2pBackbone, Cd2pForClassification
from cd2p.cli import main
from cd2p.data.clouds import Cloud, write_cloud
from cd2p.engine.embed import sample_cloud

TINY = dict(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)


def _clouds(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, name in enumerate(["a.ply", "b.pcd", "c.npy", "d.txt"]):
        n = (300, 90, 64, 40)[i]  # d has fewer points than asked for: repeated
        paths.append(write_cloud(tmp_path / "clouds" / name,
                                 Cloud(rng.normal(size=(n, 3)).astype(np.float32))))  # fmt: skip
    return paths


@pytest.mark.parametrize("kind", ["backbone", "classification"])
def test_embed_writes_the_backbones_pooled_features(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "backbone":
        model = Cd2pBackbone(**TINY)
        backbone = model
    else:
        model = Cd2pForClassification(backbone=TINY, num_classes=3, num_points=64)
        backbone = model.backbone
    model.eval().save_pretrained(tmp_path / "model")
    paths = _clouds(tmp_path)
    args = ["embed", "--model", str(tmp_path / "model"), str(paths[0]), str(tmp_path / "clouds"),
            "--out", str(tmp_path / "features"), "--tokens", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = load_from_disk(str(tmp_path / "features"))
    files = [str(paths[0])] + [str(p) for p in sorted(paths)]
    assert rows["file"] == files and rows["num_points"] == [300, 300, 90, 64, 40]
    from cd2p.data.clouds import read_cloud

    # A task model's num_points (64) is the default; a backbone has none, so 1024.
    n = 64 if kind == "classification" else 1024
    with torch.no_grad():
        clouds = torch.stack([sample_cloud(read_cloud(f).points, n, "unit-sphere") for f in files])
        out = backbone.eval()(clouds)
    expected = torch.cat([out.tokens.max(1).values, out.tokens.mean(1)], -1)
    got = torch.tensor(np.array(rows["pooled"], dtype=np.float32))
    assert got.shape == (5, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(np.array(rows["tokens"], np.float32)), out.tokens,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert np.array(rows["centers"]).shape == (5, 8, 3)
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "not empty" in again.output


def test_sampling_is_deterministic_and_normalised():
    points = np.random.default_rng(1).normal(size=(500, 3)) * 5 + 3
    a, b = sample_cloud(points, 128, "unit-sphere"), sample_cloud(points, 128, "unit-sphere")
    assert torch.equal(a, b) and a.shape == (128, 3)
    assert float(a.norm(dim=1).max()) == pytest.approx(1.0) and a.mean(0).abs().max() < 1e-5
    assert torch.equal(sample_cloud(points[:3], 6, "none")[3], torch.tensor(points[0]).float())


def test_embed_reports_a_bad_cloud_in_one_line_and_writes_nothing(tmp_path):
    Cd2pBackbone(**TINY).save_pretrained(tmp_path / "model")
    (tmp_path / "bad.txt").write_text("1 2\n")
    result = CliRunner().invoke(main, ["embed", "--model", str(tmp_path / "model"),
                                       str(tmp_path / "bad.txt"), "--out", str(tmp_path / "f")])
    assert result.exit_code != 0 and "bad.txt" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "f").exists()
