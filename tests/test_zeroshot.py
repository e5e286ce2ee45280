"""Zero-shot classification through CLIP's text space: the distill+clip objective learns the
CLIP embedding of synthetic shapes from pairs written in the real format, the exported student
reloads exactly, `cd2p zeroshot` reproduces the library's numbers and the pushed card shows
them; shuffled targets stay at chance.

The text tower is a seeded random open_clip tower (a tiny config with CLIP's real 49408-token
vocabulary, so the real tokenizer runs). Its class embeddings (CLIP's prompt ensemble over the
default prompts) are what the teacher's targets are made of: each training cloud's CLIP target
is its class's unit embedding plus Gaussian noise of norm 0.5, and its prefix target a fixed
random function of that CLIP target (as ClipCap's mapper is).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cd2p
from cd2p.cli import main
from cd2p.config import apply_overrides, load_recipe
from cd2p.data.classification import (
    load_classification_cache,
    save_classification_cache,
    stack_normalized,
)
from cd2p.data.pairs import target_file
from cd2p.data.scannet_pairs import pair_features
from cd2p.data.synthetic_shapes import primitive_shape
from cd2p.data.teacher_targets import write_targets
from cd2p.engine import read_metrics
from cd2p.engine.pretrain import export_run_student, run_pretrain
from cd2p.language.zeroshot import (
    DEFAULT_PROMPTS,
    ClipTextTower,
    class_embeddings,
    evaluate_zeroshot,
    read_prompts,
)
from cd2p.models.teacher import random_clip_model

# Six primitives whose class embeddings under the random tower of seed 10 are far enough
# apart to be told apart (pairwise cosine at most 0.67; real CLIP text embeddings of object
# names are 0.7-0.9 apart): the random tower of most seeds puts most classes within 0.95.
CLASSES = ["sphere", "cube", "cylinder", "torus", "octahedron", "bowl"]
TOWER_SEED = 10
POINTS = 256
NOISE = 0.5
STEPS = 200
TINY = [
    "model.dim=64", "model.depth=2", "model.num_heads=4", "model.num_groups=16",
    "model.group_size=16", "model.drop_path_rate=0.0", "data.num_points=256",
    "data.batch_size=16", "data.num_workers=0", "data.scale_low=1.0", "data.scale_high=1.0",
    "data.translate=0.0", f"schedule.max_steps={STEPS}", "schedule.warmup_epochs=0",
    "optim.lr=7e-4", "schedule.min_lr=7e-4", "pretrain.objective=distill+clip",
    "pretrain.num_concepts=8", "run.log_every=25", "run.checkpoint_every=1000",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 90, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_pairs(root: Path, clouds: np.ndarray, clip: torch.Tensor, prefix: torch.Tensor) -> Path:
    """Pairs in the prepared layout (two scenes), with stored prefix and clip targets."""
    from datasets import Dataset

    image = jpeg()
    halves = np.array_split(np.arange(len(clouds)), 2)
    for number, rows in enumerate(halves):
        scene = f"scene{number:04d}_00"
        eye = np.tile(np.eye(4, dtype=np.float32), (len(rows), 1, 1))
        columns = {
            "image": [{"bytes": image, "path": None}] * len(rows),
            "points": clouds[rows].astype(np.float32),
            "scene_id": [scene] * len(rows),
            "frame_index": np.arange(len(rows), dtype=np.int32),
            "pose": eye, "intrinsic_color": eye, "intrinsic_depth": eye,
        }  # fmt: skip
        scene_dir = root / "scenes" / scene
        Dataset.from_dict(columns, features=pair_features(POINTS)).save_to_disk(str(scene_dir))
        meta = {"teacher": "test: class embedding + noise", "random_teacher": "true"}
        write_targets(target_file(scene_dir, "clip"), clip[rows], meta)
        write_targets(target_file(scene_dir, "prefix"), prefix[rows], meta)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_text_model_name):
    """The shapes cache, the tower, the class embeddings and the training targets."""
    root = tmp_path_factory.mktemp("zeroshot")
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", 24), ("test", 10)):
        clouds, labels = [], []
        for label, name in enumerate(CLASSES):
            for _ in range(count):
                clouds.append(primitive_shape(name, rng, POINTS)[:, :3])
                labels.append(label)
        ids = [f"{CLASSES[y]}_{i:04d}" for i, y in enumerate(labels)]
        splits[split] = (ids, stack_normalized(clouds, split), np.array(labels))
    cache = root / "shapes"
    cache.mkdir()
    save_classification_cache(cache, "synthetic-shapes", CLASSES, splits)

    tower = ClipTextTower.random(TOWER_SEED, tiny_text_model_name)
    texts = class_embeddings(tower, CLASSES, DEFAULT_PROMPTS)  # (6, 512) unit vectors
    g = torch.Generator().manual_seed(0)
    labels = torch.from_numpy(splits["train"][2])
    clip = texts[labels] + NOISE * torch.randn(len(labels), 512, generator=g) / 512**0.5
    mapper = torch.randn(512, 10 * 768, generator=g) * 0.05
    prefix = torch.tanh(clip @ mapper).view(-1, 10, 768)
    return {
        "root": root, "cache": cache, "tower": tower, "texts": texts,
        "clouds": splits["train"][1], "clip": clip[:, None], "prefix": prefix,
    }  # fmt: skip


def pretrain(setup, name: str, order: torch.Tensor | None = None):
    clip, prefix = setup["clip"], setup["prefix"]
    if order is not None:  # every cloud gets another cloud's targets
        clip, prefix = clip[order], prefix[order]
    pairs = write_pairs(setup["root"] / f"pairs-{name}", setup["clouds"], clip, prefix)
    recipe = apply_overrides(load_recipe("demo"), TINY)
    run = setup["root"] / f"run-{name}"
    return run_pretrain(recipe, [pairs], run, progress=False, recipe_name="zeroshot-test")


@pytest.fixture(scope="module")
def trained(setup):
    # Module fixtures run before the function-scoped one_thread: small ops on a shared 2-core
    # machine are several times faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield pretrain(setup, "real")
    finally:
        torch.set_num_threads(threads)


def test_zero_shot_learns_far_above_chance_and_shuffled_targets_stay_at_chance(setup, trained):
    test = load_classification_cache(setup["cache"], "test")
    student = cd2p.from_pretrained(trained.student_dir)
    report = evaluate_zeroshot(student, test, setup["tower"])
    order = torch.randperm(len(setup["clip"]), generator=torch.Generator().manual_seed(1))
    shuffled_run = pretrain(setup, "shuffled", order)
    shuffled_student = cd2p.from_pretrained(shuffled_run.student_dir)
    shuffled = evaluate_zeroshot(shuffled_student, test, setup["tower"])
    print(f"zero-shot OA {report.metrics['oa']:.3f} (shuffled targets "
          f"{shuffled.metrics['oa']:.3f}, chance {1 / len(CLASSES):.3f})")
    # Measured: OA 0.717 on 60 held-out shapes after 200 steps; shuffled targets 0.167;
    # chance 1/6 = 0.167.
    assert report.metrics["oa"] >= 0.45
    assert shuffled.metrics["oa"] <= 0.30
    losses = [r["loss_clip"] for r in read_metrics(trained.run.run_dir, "train")]
    assert losses[-1] < 0.6 * losses[0], losses  # first window (steps 1-25) vs last


def test_exported_student_gives_the_trained_prefix_and_exports_from_a_checkpoint(
    setup, trained, tmp_path
):
    points = torch.from_numpy(setup["clouds"][:3]).float()
    model = trained.model.eval()
    expected = model.predict_all(points)
    student = cd2p.from_pretrained(trained.student_dir)
    assert type(student).__name__ == "Cd2pStudent" and student.outputs == ("prefix", "clip")
    assert (student.num_points, student.voxel_size) == (POINTS, None)  # no prepare_config
    with torch.no_grad():
        out = student(points)
    assert torch.equal(out.prefix, expected["prefix"]) and out.prefix.shape == (3, 10, 768)
    assert torch.equal(out.clip_embedding, expected["clip"][:, 0])
    card = (trained.student_dir / "README.md").read_text()
    assert "distill+clip" in card and "**random teacher**: yes" in card
    # An existing run (made before the student was exported): from its last checkpoint.
    result = CliRunner().invoke(main, ["export", str(trained.run.run_dir), "--out",
                                       str(tmp_path / "again")])  # fmt: skip
    assert result.exit_code == 0, result.output
    again = cd2p.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(points).prefix, expected["prefix"])
    assert "checkpoint step-" in (tmp_path / "again" / "README.md").read_text()
    assert export_run_student(trained.run.run_dir, tmp_path / "x").name == "x"
    bad = CliRunner().invoke(main, ["export", str(tmp_path)])
    assert bad.exit_code == 1 and "not a cd2p pretrain run" in " ".join(bad.output.split())


def test_cli_zeroshot_reproduces_the_library_and_the_pushed_card_shows_it(
    setup, trained, tmp_path, tiny_text_model_name
):
    # The text tower as a user has it: an open_clip checkpoint of both towers, given with
    # --clip-weights (the same weights as ClipTextTower.random(TOWER_SEED)).
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(random_clip_model(TOWER_SEED, tiny_text_model_name).state_dict(), weights)
    args = ["zeroshot", "--model", str(trained.student_dir), "--data", str(setup["cache"]),
            "--clip-weights", str(weights), "--clip-model-name", tiny_text_model_name,
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = trained.run.run_dir / "zeroshot" / "synthetic-shapes-test"  # next to RUN/student
    saved = json.loads((out / "metrics.json").read_text())
    expected = evaluate_zeroshot(
        cd2p.from_pretrained(trained.student_dir),
        load_classification_cache(setup["cache"], "test"),
        setup["tower"],
    )
    assert saved["oa"] == expected.metrics["oa"] and saved["macc"] == expected.metrics["macc"]
    assert saved["prompts"] == list(DEFAULT_PROMPTS) and saved["dataset"] == "synthetic-shapes"
    assert [row["name"] for row in saved["per_class"]] == CLASSES
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert "zero-shot OA" in result.output and "octahedron" in result.output

    # `cd2p push` of the student (dry run): the card has the zero-shot table and model-index.
    upload = tmp_path / "upload"
    pushed = CliRunner().invoke(main, ["push", str(trained.student_dir), "org/cd2p-student",
                                       "--dry-run", str(upload)])  # fmt: skip
    assert pushed.exit_code == 0, pushed.output
    card = (upload / "README.md").read_text()
    oa = f"{100 * saved['oa']:.2f}"
    assert f"| synthetic-shapes | test | 6 | {len(DEFAULT_PROMPTS)} | {oa} |" in card
    assert "zero-shot-classification" in card and "zeroshot/synthetic-shapes-test/metrics.json" in {
        p.relative_to(upload).as_posix() for p in upload.rglob("*") if p.is_file()
    }

    # Prompts from a file; a template without {} is refused with the file and line.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\na scan of a {}.\n\nthe {} again\n")
    assert read_prompts(prompts) == ["a scan of a {}.", "the {} again"]
    own = CliRunner().invoke(main, [*args, "--prompts", str(prompts), "--out",
                                    str(tmp_path / "own")])  # fmt: skip
    assert own.exit_code == 0, own.output
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["prompts"] == [
        "a scan of a {}.", "the {} again"]  # fmt: skip
    prompts.write_text("a photo of a {}.\na photo of a cat.\n")
    bad = CliRunner().invoke(main, [*args, "--prompts", str(prompts)])
    assert bad.exit_code == 1 and "prompts.txt:2" in bad.output and "Traceback" not in bad.output
