"""Converters: Point-MAE / Point-BERT encoders and ClipCap, on checkpoints the tests write in
the foreign layouts (real key names, made from cd2p weights by inverse renaming)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from cd2p import Cd2pBackbone
from cd2p.cli import main
from cd2p.convert import convert_clipcap, convert_point_mae

TINY = dict(dim=32, depth=3, num_heads=2, num_groups=8, group_size=8)


class NotATensor:
    """A pickled Python object: weights_only loading must refuse it."""


@pytest.fixture
def backbone() -> Cd2pBackbone:
    """A backbone whose every weight and BatchNorm statistic is away from its init value."""
    model = Cd2pBackbone(**TINY)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


def point_mae_keys(model: Cd2pBackbone, prefix: str) -> dict[str, torch.Tensor]:
    """cd2p names -> Point-MAE names (``blocks.N`` -> ``blocks.blocks.N``) under ``prefix``."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            key = "blocks." + key  # Point-MAE's TransformerEncoder holds the ModuleList
        out[prefix + key] = value.clone()
    return out


def assert_same_outputs(original: Cd2pBackbone, out_dir) -> None:
    converted = Cd2pBackbone.from_pretrained(out_dir)
    pts = torch.rand(2, 96, 3)
    a, b = original(pts, output_hidden_states=True), converted(pts, output_hidden_states=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.centers, b.centers)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True))


def test_point_mae_pretrained_layout(backbone, tmp_path):
    state = point_mae_keys(backbone, "MAE_encoder.")
    d = TINY["dim"]
    state.update({  # decoder side of Point-MAE: dropped
        "mask_token": torch.zeros(1, 1, d),
        "decoder_pos_embed.0.weight": torch.zeros(128, 3),
        "MAE_decoder.blocks.0.norm1.weight": torch.ones(d),
        "MAE_decoder.norm.weight": torch.ones(d),
        "increase_dim.0.weight": torch.zeros(96, d, 1),
    })
    ckpt = tmp_path / "pointmae_pretrain.pth"
    torch.save({"base_model": state, "epoch": 300, "metrics": {"loss": 1.0}}, ckpt)
    report = convert_point_mae(ckpt, tmp_path / "out", num_heads=2, num_groups=8, group_size=8)
    assert report.layout == "point-mae (pre-trained)"
    assert report.config["dim"] == 32 and report.config["depth"] == 3
    assert report.config["mlp_ratio"] == 4.0
    assert report.kept == len(backbone.state_dict())
    assert sorted(report.dropped) == sorted(
        ["mask_token", "decoder_pos_embed.0.weight", "MAE_decoder.blocks.0.norm1.weight",
         "MAE_decoder.norm.weight", "increase_dim.0.weight"]
    )
    assert_same_outputs(backbone, tmp_path / "out")
    # The provenance travels inside the weights (for the card that `cd2p push` renders).
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        provenance = json.loads(f.metadata()["cd2p_converted_from"])
    assert provenance["layout"] == "point-mae (pre-trained)"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "converted" in card and "pointmae_pretrain.pth" in card


def test_point_mae_finetuned_ddp_layout_via_cli(backbone, tmp_path):
    state = point_mae_keys(backbone, "module.")
    d = TINY["dim"]
    state.update({
        "module.cls_token": torch.zeros(1, 1, d),
        "module.cls_pos": torch.zeros(1, 1, d),
        "module.cls_head_finetune.0.weight": torch.zeros(256, 2 * d),
        "module.cls_head_finetune.8.bias": torch.zeros(40),
    })
    ckpt = tmp_path / "modelnet_finetuned.pth"
    torch.save({"base_model": state, "epoch": 10}, ckpt)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", "point-mae", str(ckpt), str(out), "--num-heads",
                                    "2", "--num-groups", "8", "--group-size", "8"])
    assert res.exit_code == 0, res.output
    assert "point-mae (fine-tuned)" in res.output
    assert "cls_head_finetune.* (2 tensors)" in res.output and "cls_token" in res.output
    assert_same_outputs(backbone, out)


def test_point_bert_layout_and_its_reduce_dim_refusal(backbone, tmp_path):
    state = point_mae_keys(backbone, "transformer_q.")
    state.update({
        "transformer_q.cls_head.0.weight": torch.zeros(4, 32),
        "transformer_q.lm_head.weight": torch.zeros(8, 32),
        "transformer_k.norm.weight": torch.ones(32),
        "dvae.encoder.first_conv.0.weight": torch.zeros(128, 3, 1),
    })
    ckpt = tmp_path / "pointbert.pth"
    torch.save({"base_model": state}, ckpt)
    report = convert_point_mae(ckpt, tmp_path / "out", num_heads=2, num_groups=8, group_size=8)
    assert report.layout == "point-bert" and len(report.dropped) == 4
    assert_same_outputs(backbone, tmp_path / "out")
    # Point-BERT's own encoder projects after the max-pool: not representable, so refused.
    state["transformer_q.reduce_dim.weight"] = torch.zeros(32, 32)
    torch.save({"base_model": state}, ckpt)
    with pytest.raises(ValueError, match="reduce_dim"):
        convert_point_mae(ckpt, tmp_path / "out2", num_heads=2)
    assert not (tmp_path / "out2").exists()


def test_bad_checkpoints_are_refused_clearly(backbone, tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"base_model": point_mae_keys(backbone, ""), "args": NotATensor()}, evil)
    with pytest.raises(ValueError, match="evil.pth contains pickled Python objects"):
        convert_point_mae(evil, tmp_path / "out")
    odd = tmp_path / "odd.pth"
    torch.save({"base_model": {"encoder.first_conv.0.weight": "not a tensor"}}, odd)
    with pytest.raises(ValueError, match="non-tensor values"):
        convert_point_mae(odd, tmp_path / "out")
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="no Point-MAE / Point-BERT encoder found"):
        convert_point_mae(other, tmp_path / "out")
    torch.save({"base_model": point_mae_keys(backbone, "")}, other)
    with pytest.raises(ValueError, match="not divisible by --num-heads 5"):
        convert_point_mae(other, tmp_path / "out", num_heads=5)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_point_mae(other, tmp_path / "taken", num_heads=2)
    res = CliRunner().invoke(main, ["convert", "point-mae", str(evil), str(tmp_path / "o")])
    assert res.exit_code == 1 and "Traceback" not in res.output and "refuses" in res.output


def test_clipcap_split_into_mapper_and_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cd2p.models.teacher import ClipCapMapper, load_clipcap_mapper

    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=128, n_layer=2, n_head=2,
                        bos_token_id=99, eos_token_id=99)
    gpt = GPT2LMHeadModel(config).eval()
    mapper = ClipCapMapper().eval()
    state = {f"gpt.{k}": v.clone() for k, v in gpt.state_dict().items()}
    state.update({f"clip_project.{k}": v for k, v in mapper.state_dict().items()})
    for i in range(2):  # what old transformers versions stored with every attention layer
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32)).bool()
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ckpt = tmp_path / "conceptual_weights.pt"
    torch.save(state, ckpt)

    out = tmp_path / "clipcap"
    res = CliRunner().invoke(main, ["convert", "clipcap", str(ckpt), str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["clipcap_mapper.safetensors", "gpt2"]
    with safe_open(str(out / "clipcap_mapper.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(k for k in state if k.startswith("clip_project."))
    emb = torch.randn(2, 512)
    assert torch.equal(mapper(emb), load_clipcap_mapper(out / "clipcap_mapper.safetensors")(emb))

    converted = GPT2LMHeadModel.from_pretrained(out / "gpt2").eval()
    assert converted.lm_head.weight.data_ptr() == converted.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(gpt(ids).logits, converted(ids).logits, atol=1e-6)
    with safe_open(str(out / "gpt2" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if re.search(r"\.attn\.(bias|masked_bias)$", k)]  # noqa: SIM118

    evil = tmp_path / "evil.pt"
    torch.save({**state, "extra": NotATensor()}, evil)
    with pytest.raises(ValueError, match="pickled Python objects"):
        convert_clipcap(evil, tmp_path / "x")
    assert not (tmp_path / "x").exists()
