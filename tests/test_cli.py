import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

from cd2p import __version__
from cd2p.cli import main
from cd2p.cli._common import resolve_device, resumed_run_dir
from cd2p.cli.info import environment_report


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "info" in result.output


def test_info_reports_environment():
    report = environment_report()
    for key in ("cd2p", "torch", "cuda available", "bf16 supported", "gpu", "ops backend"):
        assert key in report
    assert report["ops backend"].startswith("torch")
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "ops backend" in result.output and "torch_cluster" in result.output


def test_every_registered_command_has_help():
    runner = CliRunner()

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            result = runner.invoke(main, [*prefix, name, "--help"])
            assert result.exit_code == 0, (prefix, name, result.output)
            assert "not implemented" not in result.output.lower()
            if hasattr(cmd, "commands"):
                walk(cmd, [*prefix, name])

    walk(main, [])


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "cd2p", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout


def test_device_values_resolve_or_fail_as_usage_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(click.BadParameter, match="gpu"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(click.BadParameter, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_resume_and_out_must_name_the_same_run(tmp_path):
    run = tmp_path / "run"
    assert resumed_run_dir(None, run) == run
    assert resumed_run_dir(tmp_path / "." / "run", run) == run
    with pytest.raises(click.UsageError, match="different directories"):
        resumed_run_dir(tmp_path / "other", run)


def test_help_workflow_lists_every_main_command():
    result = CliRunner().invoke(main, ["--help"])
    workflow = result.output.split("Typical workflow:")[1].split("Options:")[0]
    for name in main.commands:
        assert f"cd2p {name}" in workflow, name


def test_recipes_list_show_and_closest_name():
    from cd2p.catalog import shipped_recipes

    runner = CliRunner()
    listed = runner.invoke(main, ["recipes"])
    assert listed.exit_code == 0, listed.output
    for info in shipped_recipes():
        assert info.about and info.description and info.paper and info.hardware, info.name
        assert info.name in listed.output
    assert "ModelNet40 OA 92.71" in listed.output  # the paper result pretrain-scannet reproduces
    gpu = {i.name for i in shipped_recipes() if i.meant_for_gpus}
    assert {"pretrain-scannet", "finetune-scannet-det", "finetune-modelnet40"} <= gpu
    assert not any("synthetic" in name or name == "demo" for name in gpu)
    shown = runner.invoke(main, ["recipes", "show", "finetune-scannet-seg"])
    assert shown.exit_code == 0 and "segmentation:" in shown.output
    typo = runner.invoke(main, ["recipes", "show", "pretrain-scanet"])
    assert typo.exit_code != 0 and "did you mean 'pretrain-scannet'" in typo.output
    from cd2p.config import load_recipe

    with pytest.raises(FileNotFoundError, match="did you mean 'finetune-modelnet40'"):
        load_recipe("finetune-modelnet")


def test_info_says_whether_the_teacher_weights_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0
    assert "CLIP weights" in result.output and "ClipCap weights" in result.output
    assert "not in the local cache" in result.output


def test_license_matches_what_the_package_and_the_cards_declare():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    license_text = (root / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = { text = "Apache-2.0" }' in (root / "pyproject.toml").read_text()
    from cd2p import Cd2pBackbone

    card = str(Cd2pBackbone(dim=32, depth=1, num_heads=2).generate_model_card())
    assert "license: apache-2.0" in card and "arXiv:2212.08974" in card
    readme = (root / "README.md").read_text()
    assert "arXiv:2212.08974" in readme and "Yao, Yuan and Zhang, Yuanhan" in readme
