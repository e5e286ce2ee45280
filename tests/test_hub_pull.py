"""`cd2p pull` and `cd2p.from_pretrained` from a populated, offline Hugging Face cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants

import cd2p
from cd2p.cli import main
from cd2p.hub import model_class, pull

TINY = dict(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)
TOKEN = "hf_pullAbCdEfGhIjKlMnOpQrStUvWxYz0123"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def make(kind: str) -> torch.nn.Module:
    cls = model_class(kind)
    if kind == "backbone":
        return cls(**TINY).eval()
    if kind == "classification":
        return cls(backbone=TINY, num_classes=3, num_points=64).eval()
    return cls(backbone=TINY, num_parts=4, num_categories=2, num_points=64,
               propagation_channels=(16,), head_channels=(16, 8)).eval()


def run(kind: str, model: torch.nn.Module, points: torch.Tensor) -> torch.Tensor:
    if kind == "backbone":
        return model(points).tokens
    if kind == "partseg":
        return model(points, torch.zeros(points.shape[0], dtype=torch.long))
    return model(points)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache, selected the standard ways (variables and the live constants)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def populate(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """The cache layout snapshot_download leaves: snapshots/<rev>/ files and refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.mark.parametrize("kind", ["backbone", "classification", "partseg"])
def test_pull_and_from_pretrained_every_kind(kind, tmp_path, offline_cache):
    model = make(kind)
    model.save_pretrained(tmp_path / "saved")
    repo_id = f"org/cd2p-{kind}"
    snapshot = populate(offline_cache, repo_id, tmp_path / "saved")

    res = CliRunner().invoke(main, ["pull", repo_id])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(snapshot)
    assert TOKEN not in res.output
    assert pull(repo_id, revision="main") == snapshot

    loaded = cd2p.from_pretrained(repo_id)
    assert type(loaded) is type(model) and not loaded.training
    pts = torch.rand(2, 64, 3)
    assert torch.equal(run(kind, model, pts), run(kind, loaded, pts))
    # A local directory works the same way.
    assert type(cd2p.from_pretrained(snapshot)) is type(model)


def test_not_a_cd2p_model_and_missing_repo(tmp_path, offline_cache):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"hidden_size": 8}')
    populate(offline_cache, "org/not-cd2p", other)
    with pytest.raises(ValueError, match="no 'model_kind': not a cd2p model"):
        cd2p.from_pretrained("org/not-cd2p")
    res = CliRunner().invoke(main, ["pull", "org/absent"])
    assert res.exit_code != 0
    (other / "config.json").write_text('{"model_kind": "teapot"}')
    with pytest.raises(ValueError, match="unknown cd2p model kind 'teapot'"):
        cd2p.from_pretrained(other)
