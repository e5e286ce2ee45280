"""Model cards: Hub-readable metadata for every kind, the paper's numbers, a snippet that runs."""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import ModelCard

from cd2p.cards import card_context
from cd2p.hub import model_class

TINY = dict(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)


def tiny_model(kind: str) -> torch.nn.Module:
    """A small random model of each kind that this cd2p provides."""
    cls = model_class(kind)
    if kind == "backbone":
        return cls(**TINY)
    if kind == "classification":
        return cls(backbone=TINY, num_classes=3, class_names=["a", "b", "c"], num_points=64)
    if kind == "partseg":
        return cls(backbone=TINY, num_parts=4, num_categories=2, num_points=64,
                   propagation_channels=(16,), head_channels=(16, 8))
    if kind == "segmentation":
        return cls(backbone=TINY, num_classes=3, class_names=["a", "b", "c"], num_points=64,
                   head_channels=(16, 8))
    if kind == "student":
        return cls(backbone=TINY, num_concepts=4, num_points=64, objective="distill+clip")
    if kind == "detection":
        return cls(backbone=TINY, num_classes=3, class_names=["a", "b", "c"], num_points=64,
                   num_queries=4, decoder_depth=1, decoder_dim=16, decoder_ffn_dim=16)
    raise AssertionError(kind)


AVAILABLE = ["backbone", "student", "classification", "partseg", "segmentation", "detection"]


@pytest.mark.parametrize("kind", AVAILABLE)
def test_card_metadata_and_usage_snippet_run(kind, tmp_path):
    model = tiny_model(kind).eval()
    path = tmp_path / f"cd2p-{kind}"
    metrics = {"oa": 0.91, "instance_miou": 0.8, "mean_class_accuracy": 0.5}
    model.save_pretrained(path, model_card_kwargs={"repo_id": str(path), "metrics": metrics})
    card = ModelCard.load(path / "README.md")
    data = card.data
    assert data.library_name == "cd2p" and data.license == "apache-2.0"
    assert {"point-cloud", "3d", "knowledge-distillation"} <= set(data.tags)
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {
        "oa": 0.91, "instance_miou": 0.8, "mean_class_accuracy": 0.5
    }
    assert data.to_dict()["model-index"][0]["name"] == f"cd2p-{kind}"
    for section in ("## Training", "## Results", "## Usage", "## Limitations", "## Citation"):
        assert section in card.text
    # The usage snippet, as a user would copy it, loads this directory and runs the model.
    [snippet] = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert f'from_pretrained("{path}")' in snippet
    exec(compile(snippet, f"{kind} card snippet", "exec"), {})


def test_paper_numbers_sit_next_to_the_run(tmp_path):
    model = tiny_model("classification")
    card = model.generate_model_card(metrics={"oa_vote": 93.4, "oa": 0.9}, dataset="ModelNet40")
    assert "| ModelNet40 OA, voting (%) | 92.1 | 92.5 | 93.0 | 93.40 |" in card.text
    assert "| ModelNet40 OA, no voting (%) | 92.38 | 92.42 | 92.71 | 90.00 |" in card.text
    # A model evaluated on other data is not put next to the paper's ModelNet40 numbers.
    other = model.generate_model_card(metrics={"oa": 0.9}, dataset="synthetic-modelnet40")
    assert "| ModelNet40 OA, no voting (%) | 92.38 | 92.42 | 92.71 | — |" in other.text
    partseg = tiny_model("partseg").generate_model_card()
    assert "| ShapeNetPart instance mIoU (%) | 85.1 | 85.9 | 85.9 | — |" in partseg.text
    assert "No evaluation is recorded" in partseg.text and partseg.data.eval_results is None


def test_fine_tuned_card_names_its_hub_base_model_and_dataset():
    recipe = {
        "task": "classification",
        "data": {"path": "/data/modelnet40_cache", "batch_size": 32, "num_points": 1024},
        "schedule": {"epochs": 300, "warmup_epochs": 10},
        "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05},
        "finetune": {"init": "org/cd2p-backbone"},
    }
    card = tiny_model("classification").generate_model_card(
        repo_id="org/cd2p-modelnet40", recipe=recipe, metrics={"oa": 0.93}
    )
    assert card.data.base_model == "org/cd2p-backbone"
    assert card.data.datasets == ["modelnet40"]
    [result] = card.data.eval_results
    assert (result.dataset_name, result.task_type) == ("ModelNet40", "point-cloud-classification")
    assert "- **epochs**: 300 (warm-up 10)" in card.text
    assert "[`org/cd2p-backbone`](https://huggingface.co/org/cd2p-backbone)" in card.text
    # A local directory as init is not a Hub model: no base_model link.
    local = card_context(model_kind="classification", class_name="X", config={},
                         num_parameters=1, recipe={"finetune": {"init": "runs/pre/backbone"}})
    assert local["base_model"] is None


def test_unknown_kind_and_missing_module_give_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown cd2p model kind 'teapot'"):
        model_class("teapot")
    import sys

    monkeypatch.setitem(sys.modules, "cd2p.models.partseg", None)  # as if not installed
    with pytest.raises(ValueError, match="'partseg' is not available in this cd2p"):
        model_class("partseg")


@pytest.mark.parametrize("kind", AVAILABLE)
def test_every_card_carries_provenance_and_the_spread_over_seeds(kind, tmp_path):
    from cd2p.provenance import provenance

    prov = provenance(data={"sha256": "ab" * 32, "files": 3, "bytes": 4096,
                            "path": "/home/me/private/prepared", "source": "modelnet40"},
                      seeds=[2], wall_time_s=7200.0,
                      device=torch.device("cpu"))  # fmt: skip
    runs = {"description": "3 seeds", "member": "seed-2", "members": 3,
            "member_metrics": {"oa": 0.9}, "selection_split": "test",
            "evaluation_split": "test", "command": "cd2p finetune classification --seeds 0,1,2",
            "groups": {"3 seeds": {"n": 3, "metrics": {"oa": {"mean": 0.91, "std": 0.01,
                                                              "min": 0.9, "max": 0.92,
                                                              "n": 3}}}}}  # fmt: skip
    model = tiny_model(kind).eval()
    model.save_pretrained(tmp_path, model_card_kwargs={"metrics": {"oa": 0.9},
                                                       "provenance": prov, "runs": runs})
    card = ModelCard.load(tmp_path / "README.md")  # the metadata still parses
    assert card.data.cd2p_provenance["data"]["sha256"] == "ab" * 32
    assert card.data.cd2p_provenance["data"]["path"] == "prepared"  # no local paths
    assert card.data.cd2p_provenance["seeds"] == [2]
    assert card.data.cd2p_runs["groups"]["3 seeds"]["metrics"]["oa"]["std"] == 0.01
    assert card.data.eval_results[0].metric_value == 0.9
    assert "| oa | 91.00 ± 1.00 | 90.00 | 92.00 | 3 | 90.00 |" in card.text
    assert "| wall time | 2 h 00 min (0 GPU-hours) |" in card.text
    assert "/home/me" not in card.text
