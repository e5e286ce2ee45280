import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cd2p import Cd2pBackbone
from cd2p.cli import main
from cd2p.models.hub import StrictLoadError

SMALL = dict(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)


@pytest.fixture
def saved(tmp_path):
    model = Cd2pBackbone(**SMALL).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    names = sorted(p.name for p in path.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_kind"] == "backbone" and config["dim"] == 32 and config["depth"] == 2
    loaded = Cd2pBackbone.from_pretrained(path)
    assert not loaded.training
    pts = torch.rand(2, 128, 3)
    assert torch.equal(model(pts).tokens, loaded(pts).tokens)


def test_model_card_is_rendered_from_hubcards(saved):
    _, path = saved
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: cd2p" in card
    assert "Cd2pBackbone.from_pretrained" in card and "32 / 2 / 2" in card


def test_strict_loading_names_missing_unexpected_and_mismatched_keys(saved):
    _, path = saved
    state = load_file(path / "model.safetensors")
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["pos_embed.2.bias"] = torch.zeros(5)
    save_file(state, path / "model.safetensors")
    with pytest.raises(StrictLoadError) as err:
        Cd2pBackbone.from_pretrained(path)
    text = str(err.value)
    assert "missing keys: norm.weight" in text
    assert "unexpected keys: extra.weight" in text
    assert "pos_embed.2.bias: file (5,) vs model (32,)" in text
    assert str(path / "model.safetensors") in text


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Cd2pBackbone.from_pretrained(tmp_path)


def test_load_by_repo_id_from_offline_cache(saved, tmp_path, monkeypatch):
    model, path = saved
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--org--cd2p-tiny" / "snapshots" / revision
    shutil.copytree(path, snapshot)
    (cache / "models--org--cd2p-tiny" / "refs").mkdir(parents=True)
    (cache / "models--org--cd2p-tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = Cd2pBackbone.from_pretrained("org/cd2p-tiny", cache_dir=cache)
    pts = torch.rand(1, 128, 3)
    assert torch.equal(model(pts).tokens, loaded(pts).tokens)


def test_a_missing_local_path_fails_at_once_without_asking_the_hub(tmp_path, monkeypatch):
    """`./x`, `runs/x` (runs/ exists), absolute paths: "no such local directory", and the Hub
    is never asked (it would retry a non-existent repo for half a minute, blaming the network)."""
    import huggingface_hub

    import cd2p
    import cd2p.hub
    import cd2p.models.hub
    from cd2p.engine.finetune import load_backbone

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked about a local path")

    for module in (huggingface_hub, cd2p.hub, cd2p.models.hub):
        monkeypatch.setattr(module, "hf_hub_download", no_hub, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./model", "runs/mn40", str(tmp_path / "gone"), "runs/mn40/model"):
        for load in (cd2p.from_pretrained, cd2p.Cd2pBackbone.from_pretrained, load_backbone):
            with pytest.raises(FileNotFoundError, match="no such local directory"):
                load(name)
    # The nearest existing folder is named once, with one separator, even when it is the root.
    with pytest.raises(FileNotFoundError, match=r"\(/ exists\)"):
        cd2p.from_pretrained("/cd2p-no-such-dir/model")
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", "classification", "--model", "runs/mn40",
                                  "--data", str(tmp_path)])  # fmt: skip
    assert result.exit_code != 0 and "runs/mn40: no such local directory" in result.output
    from cd2p.models.hub import check_local_path

    check_local_path("org/name")  # a Hub id (no local org/ directory) is left to the Hub
