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
