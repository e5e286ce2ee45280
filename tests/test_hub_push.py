"""`cd2p push`: exactly the allowed files, a card the Hub can read, one commit, no tokens.

The network is replaced at huggingface_hub's HTTP boundary (its httpx client factory) by a
small in-memory Hub, so the real ``HfApi`` code path builds and sends every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import _http
from PIL import Image
from safetensors.torch import save_file

from cd2p import Cd2pBackbone
from cd2p.cli import main
from cd2p.config import load_recipe, save_recipe
from cd2p.hub import push

SMALL = dict(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)
TOKEN = "hf_testAbCdEfGhIjKlMnOpQrStUvWxYz012345"
EXPECTED = {
    "README.md",
    "config.json",
    "model.safetensors",
    "recipe.yaml",
    "metrics.jsonl",
    "metrics.json",
    "eval/metrics.json",
    "loss.png",
    "eval/confusion.png",
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A pre-training run directory as the engine leaves it, plus things that must stay home."""
    run = tmp_path / "run"
    Cd2pBackbone(**SMALL).save_pretrained(run / "backbone")
    recipe = load_recipe(
        "pretrain-scannet",
        ["model.dim=32", "model.depth=2", "model.num_heads=2", "schedule.max_steps=40"],
    )
    save_recipe(recipe, run / "recipe.yaml")
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n" for s in (10, 20, 40))
    )
    (run / "metrics.json").write_text(json.dumps({"loss": 0.025}))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(
        json.dumps(
            {"oa": 0.875, "mean_class_accuracy": 0.8, "dataset": "ModelNet40", "split": "test",
             "per_class": {"chair": 0.9}}
        )
    )
    Image.new("RGB", (8, 8), "white").save(run / "loss.png")
    Image.new("RGB", (8, 8), "black").save(run / "eval" / "confusion.png")
    # Never uploaded: optimizer states, checkpoints, data, stray files.
    ckpt = run / "checkpoints" / "step_40"
    ckpt.mkdir(parents=True)
    save_file({"exp_avg": torch.zeros(3)}, ckpt / "optimizer.safetensors")
    save_file({"w": torch.zeros(3)}, ckpt / "model.safetensors")
    (run / "data").mkdir()
    (run / "data" / "pairs.arrow").write_bytes(b"\0" * 16)
    (run / "notes.txt").write_text("private notes")
    return run


def test_dry_run_writes_exactly_the_upload_and_a_readable_card(run_dir, tmp_path):
    out = tmp_path / "dry"
    result = push(run_dir, "org/cd2p-tiny", dry_run_dir=out)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == EXPECTED == set(result.files)
    assert result.run_dir == run_dir and result.model_dir == run_dir / "backbone"
    sources = {n: f"backbone/{n}" for n in ("model.safetensors", "config.json")}
    for name in ("model.safetensors", "config.json", "recipe.yaml", "metrics.jsonl", "loss.png"):
        assert (out / name).read_bytes() == (run_dir / sources.get(name, name)).read_bytes()

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "cd2p" and card.data.license == "apache-2.0"
    assert {"point-cloud", "3d", "knowledge-distillation"} <= set(card.data.tags)
    assert card.data.model_name == "cd2p-tiny"
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"oa", "mean_class_accuracy"}  # top-level numbers, not per-class
    assert results["oa"].metric_value == 0.875
    assert results["oa"].dataset_name == "ModelNet40" and results["oa"].dataset_split == "test"
    index = card.data.to_dict()["model-index"][0]
    assert index["name"] == "cd2p-tiny"
    assert {"type": "oa", "value": 0.875, "name": "oa"} in index["results"][0]["metrics"]
    text = card.text
    assert "steps trained**: 40" in text and "final training loss**: 0.025" in text
    assert "objective: distill" in text  # the recipe, embedded
    assert "| ModelNet40 OA, no voting (%) | 92.38 | 92.42 | 92.71 | 87.50 |" in text
    assert 'Cd2pBackbone.from_pretrained("org/cd2p-tiny")' in text

    # What was written is a loadable model identical to the run's export.
    original = Cd2pBackbone.from_pretrained(run_dir / "backbone")
    staged = Cd2pBackbone.from_pretrained(out)
    pts = torch.rand(1, 64, 3)
    assert torch.equal(original(pts).tokens, staged(pts).tokens)


def test_fine_tuning_run_keeps_its_card_metrics_base_model_and_hides_local_paths(tmp_path):
    from cd2p.models.classification import Cd2pForClassification

    run = tmp_path / "ft"
    model = Cd2pForClassification(backbone=SMALL, num_classes=3, num_points=64)
    # As `cd2p finetune` exports it: the card gets the final metrics, dataset and base model.
    model.save_pretrained(run / "model", model_card_kwargs={
        "metrics": {"oa": 0.9, "oa_vote": 0.92}, "base_model": "org/cd2p-backbone",
        "dataset": {"name": "ModelNet40", "split": "test"},
    })
    (run / "run.json").write_text(json.dumps(
        {"task": "classification", "data": "/home/alice/data/modelnet40_cache",
         "init": "org/cd2p-backbone", "recipe_name": "finetune-modelnet40"}))
    (run / "metrics.json").write_text(json.dumps(
        {"task": "classification", "samples": 2468, "votes": 10, "oa": 0.9, "oa_vote": 0.92,
         "per_class": [{"name": "a", "acc": 0.9}], "data": "/home/alice/data/modelnet40_cache"}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 300, "loss": 0.5}) + "\n"
        + json.dumps({"kind": "eval", "step": 300, "oa": 0.9}) + "\n"
        + json.dumps({"kind": "final", "checksums": [1]}) + "\n")
    out = tmp_path / "dry"
    result = push(run, "org/cd2p-modelnet40", dry_run_dir=out)
    assert set(result.files) == {"README.md", "config.json", "model.safetensors", "metrics.json",
                                 "metrics.jsonl"}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/cd2p-backbone"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "oa": 0.9, "oa_vote": 0.92}  # not the bookkeeping numbers (samples, votes)
    assert card.data.eval_results[0].dataset_name == "ModelNet40"
    assert "| ModelNet40 OA, voting (%) | 92.1 | 92.5 | 93.0 | 92.00 |" in card.text
    assert "steps trained**: 300" in card.text and "modelnet40_cache" in card.text
    assert "/home/alice" not in card.text


def test_model_directory_is_accepted_and_needs_config_and_weights(run_dir, tmp_path):
    result = push(run_dir / "backbone", "org/m", dry_run_dir=tmp_path / "a")
    assert set(result.files) == EXPECTED  # a model dir inside a run brings the run's records
    lone = tmp_path / "lone"
    Cd2pBackbone(**SMALL).save_pretrained(lone)
    result = push(lone, "org/m", dry_run_dir=tmp_path / "b")
    assert set(result.files) == {"README.md", "config.json", "model.safetensors"}
    (lone / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no exported model"):
        push(lone, "org/m", dry_run_dir=tmp_path / "c")


def test_dry_run_refuses_a_non_empty_directory(run_dir, tmp_path):
    out = tmp_path / "dry"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        push(run_dir, "org/m", dry_run_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_file_holding_a_token_stops_the_push(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = (run_dir / "recipe.yaml").read_text()
    (run_dir / "recipe.yaml").write_text(recipe.replace("description: ", f"description: {TOKEN} "))
    with pytest.raises(ValueError, match="recipe.yaml") as err:
        push(run_dir, "org/m", dry_run_dir=tmp_path / "dry")
    assert TOKEN not in str(err.value)
    assert not (tmp_path / "dry").exists()
    # A token-like string that is not the active token is refused too.
    (run_dir / "recipe.yaml").write_text(recipe)
    other = "hf_" + "Z" * 34
    (run_dir / "metrics.json").write_text(json.dumps({"loss": 0.1, "note": other}))
    with pytest.raises(ValueError, match="metrics.json"):
        push(run_dir, "org/m", dry_run_dir=tmp_path / "dry")


def test_cli_dry_run_never_shows_or_writes_the_token(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "dry"
    res = CliRunner().invoke(main, ["push", str(run_dir), "org/cd2p-tiny", "--dry-run", str(out)])
    assert res.exit_code == 0, res.output
    assert "model.safetensors" in res.output and "nothing uploaded" in res.output
    assert TOKEN not in res.output
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert "--token" not in CliRunner().invoke(main, ["push", "--help"]).output


# -- the real HfApi against an in-memory Hub -----------------------------------------------------


class FakeHub:
    """Answers the Hub's HTTP API for repo creation, branches, pre-upload, LFS and commits."""

    def __init__(self) -> None:
        self.refuse_auth = False
        self.requests: list[tuple[str, str]] = []
        self.auth: set[str] = set()
        self.created: list[dict] = []
        self.branches: list[str] = []
        self.commits: list[dict] = []
        self.lfs_store: dict[str, bytes] = {}
        self.validated: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path, method = request.url.path, request.method
        self.requests.append((method, path))
        if request.url.host == "huggingface.co":  # LFS storage URLs are pre-signed, no token
            self.auth.add(request.headers.get("authorization", ""))
        if self.refuse_auth:
            return httpx2.Response(401, json={"error": "Invalid credentials"})
        if method == "POST" and path == "/api/repos/create":
            self.created.append(json.loads(request.content))
            return httpx2.Response(200, json={"url": "https://huggingface.co/org/cd2p-tiny"})
        if method == "POST" and path == "/api/validate-yaml":
            # The Hub checks a README's metadata before committing it; so does this fake.
            content = json.loads(request.content)["content"]
            self.validated.append(content)
            try:
                header = yaml.safe_load(content.split("---\n")[1])
                assert isinstance(header["model-index"][0]["results"], list)
            except Exception as exc:  # noqa: BLE001 - any failure is a 400 for the client
                return httpx2.Response(400, json={"errors": [{"message": repr(exc)}]})
            return httpx2.Response(200, json={"warnings": []})
        if method == "POST" and "/branch/" in path:
            self.branches.append(path.rsplit("/", 1)[1])
            return httpx2.Response(200, json={})
        if method == "POST" and "/preupload/" in path:
            files = json.loads(request.content)["files"]
            binary = (".safetensors", ".png")
            modes = [
                {"path": f["path"], "shouldIgnore": False,
                 "uploadMode": "lfs" if f["path"].endswith(binary) else "regular"}
                for f in files
            ]
            return httpx2.Response(200, json={"files": modes})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            return httpx2.Response(200, json={"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"https://storage.test/{o['oid']}"}}}
                for o in objects
            ]})
        if method == "PUT" and request.url.host == "storage.test":
            self.lfs_store[path.strip("/")] = request.read()
            return httpx2.Response(200)
        if method == "POST" and "/commit/" in path:
            lines = [json.loads(x) for x in request.content.decode().splitlines() if x]
            self.commits.append({"path": path, "params": dict(request.url.params), "lines": lines})
            return httpx2.Response(200, json={
                "commitUrl": "https://huggingface.co/org/cd2p-tiny/commit/abc",
                "commitOid": "a" * 40,
                "pullRequestUrl": "https://huggingface.co/org/cd2p-tiny/discussions/1",
            })
        return httpx2.Response(404, json={"error": f"fake hub: no route for {method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the transport below is the network
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain LFS through httpx
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def test_push_sends_one_commit_with_exactly_the_files(run_dir, tmp_path, fake_hub):
    result = push(run_dir, "org/cd2p-tiny", api=HfApi(), commit_message="first model")
    assert result.commit_url.endswith("/commit/abc") and result.pr_url is None
    assert fake_hub.auth == {f"Bearer {TOKEN}"}  # the standard HF_TOKEN, sent as a header
    assert fake_hub.created == [{"name": "cd2p-tiny", "organization": "org", "type": "model"}]
    assert fake_hub.branches == []
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["path"] == "/api/models/org/cd2p-tiny/commit/main"
    header, *entries = commit["lines"]
    assert header == {"key": "header", "value": {"summary": "first model", "description": ""}}
    by_path = {e["value"]["path"]: e for e in entries}
    assert set(by_path) == EXPECTED
    dry = tmp_path / "dry"
    push(run_dir, "org/cd2p-tiny", dry_run_dir=dry)
    for name, entry in by_path.items():
        expected = (dry / name).read_bytes()
        if entry["key"] == "lfsFile":  # large/binary files: pointer in the commit, bytes via LFS
            oid = hashlib.sha256(expected).hexdigest()
            assert entry["value"]["oid"] == oid and fake_hub.lfs_store[oid] == expected
        else:
            assert base64.b64decode(entry["value"]["content"]) == expected
    assert {by_path[n]["key"] for n in ("model.safetensors", "loss.png")} == {"lfsFile"}
    assert fake_hub.validated == [(dry / "README.md").read_text()]
    sent = b"".join(fake_hub.lfs_store.values()) + json.dumps(commit["lines"]).encode()
    assert TOKEN.encode() not in sent


def test_push_to_a_branch_as_a_pull_request(run_dir, fake_hub):
    result = push(run_dir, "org/cd2p-tiny", revision="dev", create_pr=True, private=True)
    assert fake_hub.created == [
        {"name": "cd2p-tiny", "organization": "org", "type": "model", "visibility": "private"}
    ]
    assert fake_hub.branches == ["dev"]
    [commit] = fake_hub.commits
    assert commit["path"] == "/api/models/org/cd2p-tiny/commit/dev"
    assert commit["params"] == {"create_pr": "1"}
    assert commit["lines"][0]["value"]["summary"] == "Upload cd2p backbone model"
    assert result.pr_url.endswith("/discussions/1")


def test_cli_reports_a_refused_login_cleanly(run_dir, fake_hub):
    fake_hub.refuse_auth = True
    res = CliRunner().invoke(main, ["push", str(run_dir), "org/cd2p-tiny"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "hf auth login" in res.output and TOKEN not in res.output
    assert fake_hub.commits == []
