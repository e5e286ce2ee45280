"""Built for the GPU, checked on the CPU: a training step traces into one graph (no host sync,
no graph break), the split patch-embedding weight gives the same outputs, batched pair reads
equal row reads, and the GPU session script runs (``--smoke``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cd2p.config import load_recipe
from cd2p.data.pairs import PairDataset
from cd2p.engine.pretrain import build_pretrain_model
from cd2p.models.patch_embed import PatchEmbed

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.dim=32", "model.depth=2", "model.num_heads=2", "model.num_groups=8",
         "model.group_size=8", "data.num_points=64"]  # fmt: skip


@pytest.mark.parametrize("objective", ["distill", "mae+distill", "distill-clip", "mae"])
def test_pretraining_forward_traces_into_one_graph_without_breaks(objective):
    # A graph break is where torch.compile would hand back to Python, and every host sync in
    # the step (a finiteness check, an .item()) is one: none must remain.
    recipe = load_recipe("demo", [*SMALL, f"pretrain.objective={objective}"])
    model = build_pretrain_model(recipe).train()
    target = None if objective == "mae" else torch.rand(2, *model.target_shape)
    explanation = torch._dynamo.explain(model)(torch.rand(2, 64, 3), target)
    reasons = [b.reason for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


def test_the_split_patch_embedding_equals_the_concatenated_one():
    torch.manual_seed(0)
    embed = PatchEmbed(48).eval()
    groups = torch.randn(3, 5, 16, 3)
    conv, rest = embed.second_conv[0], embed.second_conv[1:]
    # The formula the split replaces: Conv1d(512 -> 512) over cat([pooled, x]).
    x = embed.first_conv(groups.reshape(15, 16, 3).transpose(1, 2))
    pooled = x.max(dim=2, keepdim=True).values
    concatenated = rest(conv(torch.cat([pooled.expand(-1, -1, 16), x], dim=1)))
    reference = concatenated.max(dim=2).values.view(3, 5, 48)
    torch.testing.assert_close(embed(groups), reference, rtol=1e-5, atol=1e-5)
    assert tuple(embed.state_dict()["second_conv.0.weight"].shape) == (512, 512, 1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from cd2p.data.pairs import scene_dirs, target_file
    from cd2p.data.scannet_pairs import prepare_scannet
    from cd2p.data.synthetic import generate_synthetic_scannet
    from cd2p.data.teacher_targets import write_targets

    root = tmp_path_factory.mktemp("pairs")
    generate_synthetic_scannet(root / "raw", num_scenes=2, frames_per_scene=12, seed=0)
    prepare_scannet(root / "raw", root / "pairs", frame_skip=1, num_points=128, split="all",
                    min_valid_points=10, progress=False)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for scene in scene_dirs(root / "pairs"):
        from datasets import load_from_disk

        rows = len(load_from_disk(str(scene)))
        write_targets(target_file(scene, "prefix"), torch.randn(rows, 10, 768, generator=g),
                      {"teacher": "test"})  # fmt: skip
    return root / "pairs"


def test_batched_and_in_memory_reads_return_the_row_reads(pairs):
    rows = PairDataset(pairs, target="prefix")
    memory = PairDataset(pairs, target="prefix", in_memory=True)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()
    batch = rows.__getitems__(order)
    for index, got, kept in zip(order, batch, memory.__getitems__(order), strict=True):
        one = rows[index]
        for item in (got, kept):
            assert torch.equal(item["points"], one["points"])
            assert torch.equal(item["target"], one["target"]) and item["target"].dtype == (
                torch.float16
            )
            assert (item["scene_id"], item["frame_index"]) == (one["scene_id"], one["frame_index"])


def test_the_gpu_session_script_runs_its_smoke_test_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"environment", "ceiling", "step", "ops", "trainer"} <= kinds, kinds
    assert all(r.get("error") is None for r in records), [r for r in records if r.get("error")]
    assert "step" in proc.stdout
