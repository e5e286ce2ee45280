"""The task table: every task declares itself once and the rest of cd2p reads the table."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import cd2p
from cd2p._resources import hubcard_path
from cd2p.cli import main
from cd2p.config import Recipe, RecipeError, apply_overrides, dump_recipe, load_recipe
from cd2p.hub import model_class
from cd2p.tasks import TASK_MODULES, all_tasks, get_task, task_names

PACKAGE = Path(cd2p.__file__).parent


@pytest.mark.parametrize("name", task_names())
def test_each_task_declares_everything_once(name):
    spec = get_task(name)
    assert spec.name == name and TASK_MODULES[name] == f"cd2p.tasks.{name}"
    cls = spec.model_class
    assert cls.model_kind == name and model_class(name) is cls
    assert hubcard_path(name).is_file()
    section = spec.section(Recipe(task=name))
    for key in ("train_split", "val_split", "eval_batch_size"):
        assert hasattr(section, key), (name, key)
    recipe = load_recipe(spec.default_recipe)
    assert recipe.task == name
    saved = yaml.safe_load(dump_recipe(recipe))
    assert spec.recipe_section in saved and "pretrain" not in saved
    others = {"finetune", "segmentation", "detection"} - {spec.recipe_section}
    assert not others & set(saved), saved.keys()
    assert spec.best_metric in {m.key for m in spec.headline}
    assert spec.paper_results and all(r.dataset_id for r in spec.paper_results)


def test_the_cli_offers_every_task():
    runner = CliRunner()
    for command in ("finetune", "evaluate"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0
        for name in task_names():
            assert name in result.output
    predict = runner.invoke(main, ["predict", "--help"])
    for spec in all_tasks():
        assert (spec.name in predict.output) == (spec.predict is not None)


def test_unknown_tasks_and_sections_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'teapot'; cd2p has classification"):
        get_task("teapot")
    with pytest.raises(RecipeError, match="recipe.task must be one of .*did you mean 'partseg'"):
        Recipe(task="partsegg")
    seg = load_recipe("finetune-synthetic-scenes")
    with pytest.raises(RecipeError, match="section 'finetune' is not read by task 'segmentation'"):
        apply_overrides(seg, ["finetune.votes=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: segmentation\nfinetune: {votes: 3}\n")
    with pytest.raises(RecipeError, match="bad.yaml: section 'finetune' is not read"):
        load_recipe(bad)
    # A section at its defaults is accepted: recipes saved by older cd2p held every section.
    old = tmp_path / "old.yaml"
    defaults = dataclasses.asdict(Recipe().finetune)
    old.write_text(yaml.safe_dump({"task": "segmentation", "finetune": defaults}))
    assert load_recipe(old).task == "segmentation"


def _string_comparisons(tree: ast.AST, names: set[str]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Constant) and side.value in names:
                    yield node.lineno, side.value


def test_no_code_outside_the_task_modules_branches_on_a_task_name():
    names = set(task_names())
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "tasks" or path.name == "linear_probe.py":
            continue  # a task's own modules (the linear probe is classification's)
        tree = ast.parse(path.read_text())
        found += [f"{path.relative_to(PACKAGE)}:{line}: {value!r}"
                  for line, value in _string_comparisons(tree, names)]  # fmt: skip
    assert not found, found
