import subprocess
import sys

from click.testing import CliRunner

from cd2p import __version__
from cd2p.cli import main
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
