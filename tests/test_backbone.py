import pytest
import torch

from cd2p import Cd2pBackbone
from cd2p.models.blocks import Attention


def point_mae_encoder_parameter_count(dim=384, depth=12, mlp_ratio=4) -> int:
    """Parameters of Point-MAE's encoder (patch embed + pos embed + blocks + norm), by layer."""
    patch = (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512
    patch += 512 * dim + dim
    pos = (3 * 128 + 128) + (128 * dim + dim)
    hidden = dim * mlp_ratio
    block = 2 * dim + dim * 3 * dim + (dim * dim + dim) + 2 * dim
    block += (dim * hidden + hidden) + (hidden * dim + dim)
    return patch + pos + depth * block + 2 * dim


def test_default_size_matches_point_mae_encoder():
    model = Cd2pBackbone()
    count = sum(p.numel() for p in model.parameters())
    assert count == point_mae_encoder_parameter_count() == 21_825_024
    # Point-MAE's key layout, so that its checkpoints convert by renaming prefixes.
    keys = set(model.state_dict())
    for key in (
        "encoder.first_conv.0.weight",
        "encoder.second_conv.3.weight",
        "pos_embed.2.weight",
        "blocks.11.attn.qkv.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
    ):
        assert key in keys
    assert "blocks.0.attn.qkv.bias" not in keys  # bias-free qkv, as in Point-MAE


# The four group settings of docs/method.md#group-settings, with a narrow model to stay fast on CPU.
@pytest.mark.parametrize(
    "points, groups, size",
    [(4096, 64, 32), (1024, 64, 32), (2048, 128, 32), (8192, 256, 32)],
)
def test_output_shapes_for_design_settings(points, groups, size):
    model = Cd2pBackbone(dim=48, depth=2, num_heads=3, num_groups=groups, group_size=size).eval()
    out = model(torch.rand(2, points, 3), output_hidden_states=True)
    assert out.tokens.shape == (2, groups, 48)
    assert out.centers.shape == (2, groups, 3)
    assert len(out.hidden_states) == 2
    assert all(h.shape == (2, groups, 48) for h in out.hidden_states)
    assert model(torch.rand(1, points, 3)).hidden_states is None


def test_position_embedding_enters_every_block():
    model = Cd2pBackbone(dim=32, depth=3, num_heads=2, num_groups=8, group_size=8).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    pts = torch.rand(1, 128, 3)
    groups = model.group(pts)
    tokens, pos = model.embed(groups.neighborhoods, groups.centers)
    _, hidden = model.encode(tokens, pos, output_hidden_states=True)
    torch.testing.assert_close(seen[0], tokens + pos)
    torch.testing.assert_close(seen[1], hidden[0] + pos)
    torch.testing.assert_close(seen[2], hidden[1] + pos)


def test_attention_equals_explicit_softmax():
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    qkv = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_stochastic_depth_is_linear_and_only_in_training():
    model = Cd2pBackbone(dim=32, depth=5, num_heads=2, num_groups=8, group_size=8)
    rates = [b.drop_path.p for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    model.eval()
    pts = torch.rand(2, 128, 3)
    torch.testing.assert_close(model(pts).tokens, model(pts).tokens)


def test_backbone_trains():
    model = Cd2pBackbone(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)
    out = model(torch.rand(2, 128, 3))
    out.tokens.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_point_bert_parts_are_optional_and_absent_by_default(tmp_path):
    import json

    plain = Cd2pBackbone(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)
    plain.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "patch_dim" not in config and "class_token" not in config
    assert not [k for k in plain.state_dict() if k.startswith(("reduce_dim", "cls_"))]
    assert plain(torch.rand(1, 64, 3)).class_token is None

    bert = Cd2pBackbone(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8,
                        patch_dim=16, class_token=True).eval()
    assert bert.encoder.second_conv[3].out_channels == 16 and bert.reduce_dim.in_features == 16
    assert bert.no_weight_decay() == {"cls_token", "cls_pos"}
    pts = torch.rand(2, 64, 3)
    out = bert(pts, output_hidden_states=True)
    assert out.tokens.shape == (2, 8, 32) and out.class_token.shape == (2, 32)
    assert all(h.shape == (2, 8, 32) for h in out.hidden_states)
    # The class token takes part in attention: without it the patch tokens differ.
    groups = bert.group(pts)
    tokens, pos = bert.embed(groups.neighborhoods, groups.centers)
    bert.class_token = False
    without, _ = bert.encode(tokens, pos)
    bert.class_token = True
    assert not torch.allclose(without, out.tokens)
    bert.save_pretrained(tmp_path / "bert")
    again = Cd2pBackbone.from_pretrained(tmp_path / "bert")
    assert torch.equal(again(pts).class_token, out.class_token)
