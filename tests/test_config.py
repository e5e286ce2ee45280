import pytest
import yaml

from cd2p._resources import recipes_dir
from cd2p.config import Recipe, RecipeError, apply_overrides, load_recipe, save_recipe


def test_shipped_recipes_load():
    recipes = sorted(recipes_dir().glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        assert isinstance(load_recipe(path), Recipe), path


def test_paper_pretrain_recipe_values():
    r = load_recipe("pretrain-scannet")
    assert (r.model.dim, r.model.depth, r.model.num_heads) == (384, 12, 6)
    assert (r.model.num_groups, r.model.group_size, r.data.num_points) == (64, 32, 4096)
    assert r.optim.name == "adamw" and r.optim.lr == 1e-3 and r.optim.weight_decay == 0.05
    assert (r.schedule.epochs, r.schedule.warmup_epochs) == (250, 10)
    assert r.pretrain.objective == "distill"


def test_overrides_are_typed():
    r = apply_overrides(
        Recipe(),
        ["optim.lr=5e-4", "schedule.max_steps=7", "optim.betas=[0.9, 0.95]", "run.compile=true",
         "optim.grad_clip=null", "data.path=/data/pairs", "pretrain.objective=mae"],
    )
    assert r.optim.lr == 5e-4 and isinstance(r.optim.lr, float)
    assert r.schedule.max_steps == 7
    assert r.optim.betas == (0.9, 0.95)
    assert r.run.compile is True
    assert r.optim.grad_clip is None
    assert r.data.path == "/data/pairs"
    assert r.pretrain.objective == "mae"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'lrr' in optim .*did you mean 'lr'"),
        ("modle.dim=3", "unknown key 'modle' in recipe .*did you mean 'model'"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("model.depth=2.5", "model.depth must be an integer"),
        ("pretrain.objective=distil", "must be one of .*did you mean 'distill'"),
        ("optim.betas=[0.9]", "must have 2 items"),
        ("optim", "section.key=value"),
        ("optim.lr.x=1", "is a value, not a section"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(RecipeError, match=message):
        apply_overrides(Recipe(), [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dimm: 3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown key 'dimm' .*did you mean 'dim'"):
        load_recipe(path)


def test_missing_recipe_lists_shipped_ones():
    with pytest.raises(FileNotFoundError, match="pretrain-scannet"):
        load_recipe("no-such-recipe")


def test_save_and_reload_round_trip(tmp_path):
    r = apply_overrides(Recipe(), ["optim.lr=2e-4", "description=run 7"])
    path = save_recipe(r, tmp_path / "run" / "recipe.yaml")
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.9, 0.999]
    assert load_recipe(path) == r
    assert [p.name for p in path.parent.iterdir()] == ["recipe.yaml"]  # no temp file left
