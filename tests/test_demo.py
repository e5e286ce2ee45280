"""`cd2p demo --quick`: the whole pipeline end to end, offline (reduced sizes, ~30 s)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from cd2p import Cd2pBackbone
from cd2p.cli import main
from cd2p.engine import read_metrics


def test_quick_demo_runs_offline_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--workdir", str(workdir), "--quick", "--random-teacher"]
    )
    assert result.exit_code == 0, result.output
    assert "RANDOM teacher" in result.output and "identical outputs" in result.output
    backbone = Cd2pBackbone.from_pretrained(str(workdir / "run" / "backbone"))
    assert backbone.dim == 64 and backbone.depth == 2
    train = read_metrics(workdir / "run", "train")
    assert train[-1]["step"] == 6 and all(r["loss"] > 0 for r in train)
    with Image.open(workdir / "run" / "metrics.png") as png:
        assert png.format == "PNG"
    assert "random teacher" in (workdir / "run" / "backbone" / "README.md").read_text()

    # Running it again replaces the previous demo; a foreign directory is refused.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    refused = CliRunner().invoke(main, ["demo", "--workdir", str(foreign), "--quick"])
    assert refused.exit_code != 0 and "not made by `cd2p demo`" in refused.output
    assert (foreign / "thesis.tex").read_text() == "keep me"


def test_local_teacher_weights_are_found_in_the_hf_cache_only(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    from cd2p.demo import find_local_teacher_weights

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert find_local_teacher_weights() is None  # empty cache: the demo uses the random teacher

    def cache(repo: str, filename: str) -> Path:
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("abc123")
        path = folder / "snapshots" / "abc123" / filename
        path.parent.mkdir(parents=True)
        path.write_bytes(b"weights")
        return path

    clip = cache("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors")
    assert find_local_teacher_weights() is None  # ClipCap still missing
    clipcap = cache("akhaliq/CLIP-prefix-captioning-conceptual-weights", "conceptual_weights.pt")
    assert find_local_teacher_weights() == (clip, clipcap)
