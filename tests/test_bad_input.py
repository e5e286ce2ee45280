"""Every command, given bad values, stops with one clear line and exit code 1 or 2: no
traceback, nothing written under the output it was asked to make, and the message names the
file, option or recipe key at fault. Error text is printed as it is (never as rich markup)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cd2p import Cd2pBackbone
from cd2p.cli import main
from cd2p.cli._common import Cd2pError
from cd2p.data.modelnet40 import prepare_modelnet40
from cd2p.data.synthetic_shapes import synthetic_modelnet40

TINY = {"dim": 32, "depth": 2, "num_heads": 2, "num_groups": 8, "group_size": 8}
FAST = ["--set", "schedule.epochs=1", "--set", "data.batch_size=8", "--set", "run.device=cpu",
        "--set", "finetune.votes=1", "--set", "model.dim=32", "--set", "model.depth=2",
        "--set", "model.num_heads=2", "--set", "model.num_groups=8", "--set",
        "model.group_size=8", "--set", "data.num_points=128", "--set", "data.num_workers=0",
        "--set", "schedule.warmup_epochs=0"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good inputs that the bad cases below damage one value of: a prepared classification
    data set, a saved backbone, a raw ModelNet40 root and a small recipe."""
    root = tmp_path_factory.mktemp("bad_input")
    raw = synthetic_modelnet40(root / "raw", num_classes=3, train_per_class=4, test_per_class=2,
                               num_points=200, seed=0, show_progress=False)  # fmt: skip
    data = prepare_modelnet40(raw, root / "data", num_points=128, show_progress=False)
    backbone = root / "backbone"
    Cd2pBackbone(**TINY).save_pretrained(backbone)
    recipe = root / "recipe.yaml"
    recipe.write_text("task: classification\ndata:\n  batch_size: 0\n")
    broken = root / "broken_config"
    shutil.copytree(backbone, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_heads": 5}))
    unknown = root / "unknown_key"
    shutil.copytree(backbone, unknown)
    (unknown / "config.json").write_text(json.dumps({**config, "layers": 3}))
    wrong_kind = root / "wrong_kind"
    shutil.copytree(backbone, wrong_kind)
    (wrong_kind / "config.json").write_text(json.dumps({**config, "model_kind": "detection"}))
    not_json = root / "not_json"
    shutil.copytree(backbone, not_json)
    (not_json / "config.json").write_text('{"dim": 32,')
    truncated = root / "truncated"
    shutil.copytree(backbone, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return {"root": root, "truncated": truncated, "raw": raw, "data": data,
            "backbone": backbone, "recipe": recipe, "broken": broken, "unknown": unknown,
            "wrong_kind": wrong_kind,
            "not_json": not_json}  # fmt: skip


# (id, arguments with {placeholders}, text the error must contain)
CASES = [
    ("batch-size-0", ["finetune", "classification", "--data", "{data}", "--out", "{out}", *FAST,
                      "--set", "data.batch_size=0"], "data.batch_size must be >= 1"),
    ("checkpoint-every-0", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                            *FAST, "--set", "run.checkpoint_every=0"],
     "run.checkpoint_every must be >= 1"),
    ("log-every-0", ["pretrain", "--data", "{data}", "--out", "{out}", "--set",
                     "run.log_every=0"], "run.log_every must be >= 1"),
    ("heads-not-dividing", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                            *FAST, "--set", "model.num_heads=3"], "must divide"),
    ("negative-points", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                         *FAST, "--set", "data.num_points=-5"], "data.num_points must be >= 1"),
    ("negative-scale", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                        *FAST, "--set", "data.scale_low=-1"], "data.scale_low must be > 0"),
    ("string-for-number", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                           *FAST, "--set", "optim.lr=fast"], "optim.lr must be a number"),
    ("nan-lr", ["finetune", "classification", "--data", "{data}", "--out", "{out}", *FAST,
                "--set", "optim.lr=.nan"], "finite"),
    ("unknown-key", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                     "--set", "optim.learning_rate=1"], "unknown key 'learning_rate'"),
    ("bad-yaml-value", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                        "--set", "optim.betas=[0.9"], "not a YAML value"),
    ("recipe-file", ["finetune", "classification", "--recipe", "{recipe}", "--data", "{data}",
                     "--out", "{out}"], "recipe.yaml: recipe.data.batch_size must be >= 1"),
    ("other-task-section", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                            "--set", "detection.num_queries=8"], "not read by task"),
    ("config-heads", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                      *FAST, "--init", "{broken}"], "broken_config/config.json"),
    ("config-unknown-key", ["embed", "--model", "{unknown}", "{data}", "--out", "{out}"],
     "unknown key 'layers'"),
    ("config-model-kind", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                           *FAST, "--init", "{wrong_kind}"], "holds a 'detection' model"),
    ("config-not-json", ["embed", "--model", "{not_json}", "{data}", "--out", "{out}"],
     "is not valid JSON"),
    ("weights-truncated", ["embed", "--model", "{truncated}", "{data}", "--out", "{out}"],
     "truncated/model.safetensors: not a readable safetensors file"),
    ("init-truncated", ["finetune", "classification", "--data", "{data}", "--out", "{out}",
                        *FAST, "--init", "{truncated}"], "damaged or truncated"),
    ("missing-data", ["finetune", "classification", "--data", "{root}/nowhere", "--out", "{out}"],
     "nowhere"),
    ("missing-model", ["evaluate", "classification", "--model", "{root}/nowhere", "--data",
                       "{data}"], "nowhere"),
    ("prepare-points-0", ["prepare", "modelnet40", "{raw}", "{out}", "--points", "0"],
     "--points"),
    ("prepare-bad-shard", ["prepare", "scannet", "{raw}", "{out}", "--shard", "3/2"], "shard"),
    ("synthetic-frames-0", ["synthetic", "scannet", "{out}", "--frames", "0"], "--frames"),
    ("synthetic-negative-noise", ["synthetic", "modelnet40", "{out}", "--noise", "-1"],
     "--noise"),
    ("predict-missing-cloud", ["predict", "segmentation", "--model", "{backbone}",
                               "{root}/no.ply", "{out}"], "no.ply"),
    ("caption-limit-0", ["caption", "--model", "{backbone}", "{raw}", "--limit", "0"],
     "--limit"),
    ("zeroshot-batch-0", ["zeroshot", "--model", "{backbone}", "--data", "{data}",
                          "--batch-size", "0"], "--batch-size"),
    ("compare-missing-run", ["compare", "{root}/run-a", "{root}/run-b"], "run-a"),
    ("plot-missing-run", ["plot", "{root}/nowhere"], "nowhere"),
    ("export-not-a-run", ["export", "{data}"], "data"),
    ("push-not-a-run", ["push", "{root}/nowhere", "org/name", "--dry-run", "{out}"], "nowhere"),
    ("convert-missing", ["convert", "point-mae", "{root}/no.pth", "{out}"], "no.pth"),
    ("recipes-unknown", ["recipes", "show", "pretrain-scanet"], "pretrain-scannet"),
    ("device-name", ["finetune", "classification", "--data", "{data}", "--out", "{out}", *FAST,
                     "--set", "run.device=gpu0"], "gpu0"),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_values_give_one_line_and_write_nothing(files, tmp_path, args, expected):
    out = tmp_path / "out"
    filled = [a.format(out=out, **files) for a in args]
    result = CliRunner().invoke(main, filled)
    text = result.output
    # A traceback would come back as an exception other than the exit itself.
    assert isinstance(result.exception, SystemExit), (filled, text, result.exception)
    assert result.exit_code in (1, 2), (result.exit_code, text)
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, text
    assert expected in text, text
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def test_error_text_is_printed_as_it_is_not_as_markup(capsys):
    # A path or a peer's message holding [...] (a scene id, gloo's "[127.0.0.1]:29500") is
    # neither swallowed as a style nor a markup error.
    message = "connection closed by peer [127.0.0.1]:29500 in /data/[bold]/scene[/x]"
    Cd2pError(message).show()
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_failed_start_leaves_no_half_made_run(files, tmp_path):
    # The data is found to be unusable only once the run has started (a split with no shapes):
    # the same --out is usable again once the input is fixed.
    out = tmp_path / "run"
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    args = ["finetune", "classification", "--data", str(data), "--out", str(out), *FAST,
            "--set", "finetune.val_split=nosuch"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "nosuch" in result.output, result.output
    assert not out.exists() or not any(out.iterdir())
    result = CliRunner().invoke(main, args[:-2])
    assert result.exit_code == 0, result.output
    assert (out / "model" / "model.safetensors").is_file()
