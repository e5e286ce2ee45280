"""Distillation / MAE pre-training model: shapes, shared concept block, masking, learning."""

from __future__ import annotations

import math

import pytest
import torch

from cd2p.models import Cd2pBackbone
from cd2p.models.alignment import AlignmentHead
from cd2p.models.blocks import CrossBlock
from cd2p.models.concepts import ConceptExtractor
from cd2p.models.distill import OBJECTIVES, Cd2pPretrainModel
from cd2p.models.mae import MaeDecoder, gather_patches, random_mask, reconstruction_loss

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(dim=64, depth=4, num_heads=4, num_groups=16, group_size=16)


def tiny_model(objective: str, **kwargs) -> Cd2pPretrainModel:
    return Cd2pPretrainModel(TINY, objective, decoder_heads=4, **kwargs)


def target_for(model: Cd2pPretrainModel, batch: int) -> torch.Tensor | None:
    shape = model.target_shape
    return None if shape is None else torch.randn(batch, *shape)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- components ------------------------------------------------------------------------------
def test_concept_extractor_shares_one_block_across_layers():
    torch.manual_seed(0)
    extractor = ConceptExtractor(64, num_concepts=32, num_heads=4)
    hidden = [torch.randn(3, 16, 64) for _ in range(5)]
    calls = []
    extractor.block.register_forward_hook(lambda *_: calls.append(1))
    out = extractor(hidden)
    assert out.shape == (3, 32, 64)
    assert len(calls) == 5  # applied once per hidden state
    # Parameters: the queries, ONE cross-attention block, the final norm; nothing per layer.
    expected = 32 * 64 + n_params(CrossBlock(64, 4)) + 2 * 64
    assert n_params(extractor) == expected
    names = [name for name, _ in extractor.named_parameters()]
    assert all(n == "queries" or n.startswith(("block.", "norm.")) for n in names), names


def test_concept_extractor_reads_every_layer():
    # Changing an early hidden state changes the concepts: the block really runs per layer.
    torch.manual_seed(0)
    extractor = ConceptExtractor(64, num_heads=4).eval()
    hidden = [torch.randn(2, 16, 64) for _ in range(4)]
    changed = list(hidden)
    changed[0] = torch.randn(2, 16, 64)
    assert not torch.allclose(extractor(hidden), extractor(changed))
    with pytest.raises(ValueError, match="at least one"):
        extractor([])


def test_alignment_head_shapes():
    head = AlignmentHead(64, in_tokens=32, out_tokens=10, out_dim=768)
    assert head(torch.randn(2, 32, 64)).shape == (2, 10, 768)
    assert dict(head.named_parameters())["token_map.weight"].shape == (10, 32)
    clip = AlignmentHead(64, in_tokens=32, out_tokens=1, out_dim=512)
    assert clip(torch.randn(2, 32, 64)).shape == (2, 1, 512)
    with pytest.raises(ValueError, match=r"\(B, 32, dim\)"):
        head(torch.randn(2, 16, 64))


def test_random_mask_hides_exactly_round_ratio():
    gen = torch.Generator().manual_seed(0)
    visible, masked = random_mask(6, 16, 0.6, generator=gen)
    assert masked.shape == (6, round(0.6 * 16)) and visible.shape == (6, 16 - round(0.6 * 16))
    for v, m in zip(visible, masked, strict=True):
        assert sorted(v.tolist() + m.tolist()) == list(range(16))  # a partition of the patches
    assert len({tuple(m.tolist()) for m in masked}) > 1  # independent per sample
    again = random_mask(6, 16, 0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[1], masked)  # seeded
    assert random_mask(2, 64, 0.6)[1].shape == (2, 38)
    with pytest.raises(ValueError, match="at least one"):
        random_mask(2, 4, 0.05)


def test_mae_decoder_and_loss_shapes():
    decoder = MaeDecoder(64, group_size=16, depth=4, num_heads=4)
    pred = decoder(torch.randn(2, 6, 64), torch.randn(2, 6, 3), torch.randn(2, 10, 3))
    assert pred.shape == (2, 10, 16, 3)
    rates = [block.drop_path.p for block in decoder.blocks]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    loss = reconstruction_loss(pred, pred.detach() + 0.1)
    assert loss.dim() == 0 and loss.item() > 0
    assert reconstruction_loss(pred, pred).item() == pytest.approx(0.0, abs=1e-6)


# -- the pre-training model -----------------------------------------------------------------
def test_target_shapes_and_heads_per_objective():
    shapes = {o: tiny_model(o).target_shape for o in OBJECTIVES}
    assert shapes == {
        "distill": (10, 768),
        "distill-no-concept": (10, 768),
        "distill-clip": (1, 512),
        "distill+clip": (10, 768),
        "mae": None,
        "mae+distill": (10, 768),
    }
    keys = {o: {k.split(".")[0] for k in tiny_model(o).state_dict()} for o in OBJECTIVES}
    assert keys["distill"] == {"backbone", "concepts", "align"}
    assert keys["distill-no-concept"] == {"backbone", "align"}
    assert keys["distill+clip"] == {"backbone", "concepts", "align", "clip_head"}
    assert keys["mae"] == {"backbone", "mae_decoder"}
    assert keys["mae+distill"] == {"backbone", "concepts", "align", "mae_decoder"}
    no_concept = tiny_model("distill-no-concept")
    assert no_concept.align.token_map.weight.shape == (10, TINY["num_groups"])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown objective"):
        Cd2pPretrainModel(TINY, "contrastive")
    with pytest.raises(ValueError, match="unknown backbone_config keys"):
        Cd2pPretrainModel({**TINY, "width": 3})
    model = tiny_model("distill")
    points = torch.randn(2, 256, 3)
    with pytest.raises(ValueError, match="needs a teacher target"):
        model(points)
    with pytest.raises(ValueError, match=r"expects targets of shape \(2, 10, 768\)"):
        model(points, torch.randn(2, 1, 512))
    with pytest.raises(ValueError, match="hides"):
        Cd2pPretrainModel({**TINY, "num_groups": 2}, "mae", mask_ratio=0.1)


def test_concept_block_runs_after_every_backbone_block():
    torch.manual_seed(0)
    model = tiny_model("distill")
    calls = []
    model.concepts.block.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 256, 3), target_for(model, 2))
    assert len(calls) == TINY["depth"]
    assert not any(".blocks." in k for k in model.state_dict() if k.startswith("concepts."))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_forward_backward(objective):
    torch.manual_seed(0)
    model = tiny_model(objective)
    points = torch.randn(4, 256, 3)
    target = target_for(model, 4)
    if target is not None:
        target.requires_grad_(True)
    clip = torch.randn(4, 1, 512, requires_grad=True) if objective == "distill+clip" else None
    out = model(points, target, clip_target=clip)
    expected = {"loss"} | ({"loss_distill"} if model.target_shape else set())
    expected |= {"loss_mae"} if "mae" in objective else set()
    expected |= {"loss_clip"} if clip is not None else set()
    assert set(out) == expected
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    if objective == "mae+distill":
        assert out["loss"].item() == pytest.approx((out["loss_distill"] + out["loss_mae"]).item())
    if clip is not None:  # prefix MSE + clip_weight (1) x cosine distance of the second head
        assert 0 < out["loss_clip"].item() < 2
        assert out["loss"].item() == pytest.approx((out["loss_distill"] + out["loss_clip"]).item())
        with pytest.raises(ValueError, match="needs a teacher clip_target"):
            model(points, target)
    out["loss"].backward()
    # Every parameter takes part (DDP needs no find_unused_parameters) and grads are finite.
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
    for part in ("backbone", "concepts", "align", "clip_head", "mae_decoder"):
        module = getattr(model, part, None)
        if module is not None:
            assert sum(p.grad.abs().sum() for p in module.parameters()) > 0, part
    if target is not None:
        assert target.grad is None  # nothing flows back to the teacher's side
    if clip is not None:
        assert clip.grad is None


def test_mae_encoder_sees_only_visible_patches():
    torch.manual_seed(0)
    model = tiny_model("mae").eval()  # eval: BatchNorm / drop path deterministic
    points = torch.randn(3, 256, 3)
    seen = {}
    model.backbone.encoder.register_forward_hook(lambda m, i, o: seen.update(embedded=o))
    model.backbone.pos_embed.register_forward_hook(lambda m, i, o: seen.update(pos=o))
    model.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.update(block_in=i[0]))
    model.mae_decoder.register_forward_hook(lambda m, i, o: seen.update(pred=o))
    model(points, generator=torch.Generator().manual_seed(7))

    g, m = TINY["num_groups"], round(0.6 * TINY["num_groups"])
    visible, masked = random_mask(3, g, 0.6, generator=torch.Generator().manual_seed(7))
    assert seen["block_in"].shape == (3, g - m, TINY["dim"])
    # The blocks received exactly the visible patches' tokens plus their positions.
    expected = gather_patches(seen["embedded"] + seen["pos"], visible)
    torch.testing.assert_close(seen["block_in"], expected)
    assert seen["pred"].shape == (3, m, TINY["group_size"], 3)


def test_export_backbone_is_a_standalone_hub_model(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("distill")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 256, 3), target_for(model, 4))["loss"].backward()
    opt.step()
    exported = model.export_backbone()
    assert isinstance(exported, Cd2pBackbone)
    trained, copied = model.backbone.state_dict(), exported.state_dict()
    assert list(trained) == list(copied)
    for name, a in trained.items():
        b = copied[name]
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr() or a.numel() == 0, name
    exported.save_pretrained(tmp_path / "backbone")
    reloaded = Cd2pBackbone.from_pretrained(tmp_path / "backbone")
    points = torch.randn(2, 256, 3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(points).tokens, model.backbone.eval()(points).tokens)
        next(model.backbone.parameters()).add_(1.0)  # training on does not touch the export
    assert not torch.equal(next(model.backbone.parameters()), next(exported.parameters()))


# -- learning --------------------------------------------------------------------------------
def synthetic_shapes(n: int, points: int, gen: torch.Generator):
    """Clouds ``(n, points, 3)`` of four primitive kinds at random scales, and a descriptor
    ``(n, 5)`` (kind one-hot + log scale) the fake teacher sees."""
    kinds = torch.arange(n) % 4
    theta = 2 * math.pi * torch.rand(n, points, generator=gen)
    u = torch.rand(n, points, generator=gen)
    clouds = []
    for kind, a, b in zip(kinds.tolist(), theta, u, strict=True):
        if kind == 0:  # sphere
            z = 2 * b - 1
            r = (1 - z * z).sqrt()
            cloud = torch.stack([r * a.cos(), r * a.sin(), z], -1)
        elif kind == 1:  # cylinder
            cloud = torch.stack([a.cos(), a.sin(), 2 * b - 1], -1)
        elif kind == 2:  # flat disc
            cloud = torch.stack([b.sqrt() * a.cos(), b.sqrt() * a.sin(), torch.zeros_like(b)], -1)
        else:  # cube surface
            cloud = torch.rand(points, 3, generator=gen) * 2 - 1
            face = torch.randint(0, 3, (points,), generator=gen)
            sign = torch.randint(0, 2, (points,), generator=gen).float() * 2 - 1
            cloud[torch.arange(points), face] = sign
        clouds.append(cloud)
    log_scale = torch.rand(n, 1, generator=gen) - 0.5
    clouds = torch.stack(clouds) * log_scale.exp().unsqueeze(1)
    descriptor = torch.cat([torch.nn.functional.one_hot(kinds, 4).float(), log_scale], dim=1)
    return clouds, descriptor


def train(model, clouds, target, key, steps, lr=1e-3):
    """Adam on the whole (small) set; returns the eval-mode loss before and after."""

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(clouds, target, generator=torch.Generator().manual_seed(1))[key]
        model.train()
        return loss.item()

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(clouds, target)["loss"].backward()
        opt.step()
    return before, evaluate()


LEARN = dict(dim=64, depth=4, num_heads=4, num_groups=8, group_size=8)


def test_distillation_loss_falls():
    gen = torch.Generator().manual_seed(0)
    clouds, descriptor = synthetic_shapes(8, 64, gen)
    # Fake teacher: a fixed random linear map of the standardised shape descriptor, each
    # target channel standardised over the set, so the best input-blind guess (the mean) scores
    # 1.0 and going below 0.5 needs the student to tell the clouds apart.
    descriptor = (descriptor - descriptor.mean(0)) / descriptor.std(0)
    target = descriptor @ torch.randn(5, 10 * 768, generator=gen)
    target = ((target - target.mean(0)) / target.std(0)).view(8, 10, 768)
    torch.manual_seed(0)
    model = Cd2pPretrainModel(LEARN, "distill")
    before, after = train(model, clouds, target, "loss_distill", steps=200)
    assert before > 0.8
    assert after < 0.5 * before, (before, after)


def test_mae_loss_falls():
    gen = torch.Generator().manual_seed(0)
    clouds, _ = synthetic_shapes(8, 64, gen)
    torch.manual_seed(0)
    model = Cd2pPretrainModel(LEARN, "mae", decoder_heads=4)
    before, after = train(model, clouds, None, "loss_mae", steps=60)
    assert after < 0.5 * before, (before, after)
