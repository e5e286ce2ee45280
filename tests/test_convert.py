"""Converters: Point-MAE / Point-BERT checkpoints and ClipCap.

The Point-MAE and Point-BERT models below are written from their own code (Point-MAE:
models/Point_MAE.py ``PointTransformer`` and ``Point_MAE``, segmentation/models/pt.py
``get_model``; Point-BERT: models/Point_BERT.py ``PointTransformer`` and ``MaskTransformer``),
with their module names, so that their state dicts have the real key layouts. Their grouping
is pointnet2_ops' CUDA FPS (first index 0; points with |p|^2 <= 1e-3 are never chosen) and
kNN. The tests build them with random weights, save them as the projects save checkpoints,
convert, and compare the outputs.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors import safe_open
from torch import nn

import cd2p
from cd2p import Cd2pBackbone, Cd2pForClassification
from cd2p.cli import main
from cd2p.convert import convert_clipcap, convert_point_mae
from cd2p.data.shapenetpart import STANDARD_PARTS

DIM, HEADS, GROUPS, SIZE = 32, 2, 8, 8


class NotATensor:
    """A pickled Python object: weights_only loading must refuse it."""


# -- the projects' architectures (their names and forward passes) ------------------------------


def their_fps(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """pointnet2_ops furthest_point_sample + gather: centers ``(B, count, 3)``."""
    b, n, _ = xyz.shape
    idx = torch.zeros(b, count, dtype=torch.long)
    temp = torch.full((b, n), 1e10)
    usable = xyz.square().sum(-1) > 1e-3  # the kernel skips points this close to the origin
    old = torch.zeros(b, dtype=torch.long)
    for j in range(1, count):
        d = (xyz - xyz[torch.arange(b), old].unsqueeze(1)).square().sum(-1)
        temp = torch.where(usable, torch.minimum(temp, d), temp)
        old = torch.where(usable, temp, torch.full_like(temp, -1.0)).argmax(-1)
        idx[:, j] = old
    return xyz[torch.arange(b).unsqueeze(1), idx]


class Group(nn.Module):  # FPS + KNN
    def __init__(self, num_group, group_size):
        super().__init__()
        self.num_group, self.group_size = num_group, group_size

    def forward(self, xyz):
        center = their_fps(xyz, self.num_group)
        idx = torch.cdist(center, xyz).topk(self.group_size, largest=False).indices  # knn_cuda
        neighborhood = xyz[torch.arange(len(xyz)).view(-1, 1, 1), idx]
        return neighborhood - center.unsqueeze(2), center


class Encoder(nn.Module):  # mini-PointNet
    def __init__(self, encoder_channel):
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128),
                                        nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512),
                                         nn.ReLU(inplace=True), nn.Conv1d(512, encoder_channel, 1))

    def forward(self, point_groups):
        bs, g, n, _ = point_groups.shape
        feature = self.first_conv(point_groups.reshape(bs * g, n, 3).transpose(2, 1))
        feature_global = torch.max(feature, dim=2, keepdim=True)[0]
        feature = torch.cat([feature_global.expand(-1, -1, n), feature], dim=1)
        feature = self.second_conv(feature)
        return torch.max(feature, dim=2)[0].reshape(bs, g, self.encoder_channel)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp, self.attn = Mlp(dim, 4 * dim), Attention(dim, num_heads)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    def __init__(self, embed_dim, depth, num_heads, fetch_idx=None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.fetch_idx = fetch_idx

    def forward(self, x, pos):
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x + pos)
            if self.fetch_idx is not None and i in self.fetch_idx:
                features.append(x)
        return x if self.fetch_idx is None else features


def pos_mlp(dim):
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))


class PointMAEClassifier(nn.Module):
    """Point-MAE's fine-tuning model (models/Point_MAE.py PointTransformer); with
    ``point_bert=True`` Point-BERT's (models/Point_BERT.py PointTransformer): a 256-wide patch
    encoder + reduce_dim, and a head without BatchNorm."""

    def __init__(self, depth=3, cls_dim=5, point_bert=False):
        super().__init__()
        self.point_bert = point_bert
        self.group_divider = Group(GROUPS, SIZE)
        self.encoder = Encoder(256 if point_bert else DIM)
        if point_bert:
            self.reduce_dim = nn.Linear(256, DIM)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos_embed = pos_mlp(DIM)
        self.blocks = TransformerEncoder(DIM, depth, HEADS)
        self.norm = nn.LayerNorm(DIM)
        if point_bert:
            self.cls_head_finetune = nn.Sequential(
                nn.Linear(DIM * 2, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(256, cls_dim))
        else:
            self.cls_head_finetune = nn.Sequential(
                nn.Linear(DIM * 2, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                nn.Dropout(0.5), nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                nn.Dropout(0.5), nn.Linear(256, cls_dim))

    def forward(self, pts):
        neighborhood, center = self.group_divider(pts)
        tokens = self.encoder(neighborhood)
        if self.point_bert:
            tokens = self.reduce_dim(tokens)
        b = tokens.size(0)
        x = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        pos = torch.cat((self.cls_pos.expand(b, -1, -1), self.pos_embed(center)), dim=1)
        x = self.norm(self.blocks(x, pos))
        return self.cls_head_finetune(torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1))


class MaskTransformer(nn.Module):
    """The pre-trained encoders, evaluated without masking (``noaug``): Point-MAE's
    ``MAE_encoder`` and Point-BERT's ``transformer_q`` (reduce_dim, class token, heads)."""

    def __init__(self, depth=3, point_bert=False):
        super().__init__()
        self.point_bert = point_bert
        self.encoder = Encoder(256 if point_bert else DIM)
        if point_bert:
            self.reduce_dim = nn.Linear(256, DIM)
            self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
            self.mask_token = nn.Parameter(torch.randn(1, 1, DIM))
            self.cls_pos = nn.Parameter(torch.randn(1, 1, DIM))
            self.lm_head = nn.Linear(DIM, 64)
            self.cls_head = nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, 16))
        self.pos_embed = pos_mlp(DIM)
        self.blocks = TransformerEncoder(DIM, depth, HEADS)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, neighborhood, center):
        """Normed tokens ``(B, [1 +] G, DIM)`` (Point-BERT: the class token first)."""
        x = self.encoder(neighborhood)
        pos = self.pos_embed(center)
        if self.point_bert:
            x = self.reduce_dim(x)
            w = torch.zeros(x.shape[:2] + (1,))  # noaug: nothing masked
            x = x * (1 - w) + self.mask_token.expand(len(x), x.shape[1], -1) * w
            x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1)
            pos = torch.cat((self.cls_pos.expand(len(x), -1, -1), pos), dim=1)
        return self.norm(self.blocks(x, pos))


class PointMAEPretrain(nn.Module):
    def __init__(self):
        super().__init__()
        self.MAE_encoder = MaskTransformer()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.decoder_pos_embed = pos_mlp(DIM)
        self.MAE_decoder = TransformerEncoder(DIM, 1, HEADS)
        self.increase_dim = nn.Sequential(nn.Conv1d(DIM, 3 * SIZE, 1))


class PointBERTPretrain(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_q = MaskTransformer(point_bert=True)
        self.transformer_k = MaskTransformer(point_bert=True)
        self.dvae = nn.Module()
        self.dvae.encoder = Encoder(64)
        self.dvae.codebook = nn.Parameter(torch.randn(64, 16))
        self.register_buffer("queue", torch.randn(16, 32))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


class PointNetFeaturePropagation(nn.Module):
    def __init__(self, in_channel, mlp):
        super().__init__()
        self.mlp_convs, self.mlp_bns = nn.ModuleList(), nn.ModuleList()
        for out_channel in mlp:
            self.mlp_convs.append(nn.Conv1d(in_channel, out_channel, 1))
            self.mlp_bns.append(nn.BatchNorm1d(out_channel))
            in_channel = out_channel

    def forward(self, xyz1, xyz2, points1, points2):
        xyz1, xyz2, points2 = xyz1.permute(0, 2, 1), xyz2.permute(0, 2, 1), points2.permute(0, 2, 1)
        b, n, _ = xyz1.shape
        dists = -2 * torch.matmul(xyz1, xyz2.permute(0, 2, 1))
        dists += xyz1.square().sum(-1).view(b, n, 1) + xyz2.square().sum(-1).view(b, 1, -1)
        dists, idx = dists.sort(dim=-1)
        dists, idx = dists[:, :, :3], idx[:, :, :3]
        weight = 1.0 / (dists + 1e-8)
        weight = weight / weight.sum(dim=2, keepdim=True)
        gathered = points2[torch.arange(b).view(-1, 1, 1), idx]
        interpolated = (gathered * weight.view(b, n, 3, 1)).sum(dim=2)
        x = torch.cat([points1.permute(0, 2, 1), interpolated], dim=-1).permute(0, 2, 1)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns, strict=True):
            x = F.relu(bn(conv(x)))
        return x


class PointMAEPartSeg(nn.Module):
    """Point-MAE's segmentation/models/pt.py get_model, its widths scaled with DIM."""

    def __init__(self, cls_dim=50, prop=(64, 48)):
        super().__init__()
        self.group_divider = Group(16, SIZE)
        self.encoder = Encoder(DIM)
        self.pos_embed = pos_mlp(DIM)
        self.blocks = TransformerEncoder(DIM, 12, HEADS, fetch_idx=[3, 7, 11])
        self.norm = nn.LayerNorm(DIM)
        self.label_conv = nn.Sequential(nn.Conv1d(16, 64, kernel_size=1, bias=False),
                                        nn.BatchNorm1d(64), nn.LeakyReLU(0.2))
        self.propagation_0 = PointNetFeaturePropagation(3 * DIM + 3, list(prop))
        self.convs1 = nn.Conv1d(prop[-1] + 6 * DIM + 64, 40, 1)
        self.dp1 = nn.Dropout(0.5)
        self.convs2 = nn.Conv1d(40, 24, 1)
        self.convs3 = nn.Conv1d(24, cls_dim, 1)
        self.bns1, self.bns2 = nn.BatchNorm1d(40), nn.BatchNorm1d(24)
        self.relu = nn.ReLU()

    def forward(self, pts, cls_label):
        b, _, n = pts.shape
        pts = pts.transpose(-1, -2)
        neighborhood, center = self.group_divider(pts)
        feature_list = self.blocks(self.encoder(neighborhood), self.pos_embed(center))
        feature_list = [self.norm(x).transpose(-1, -2).contiguous() for x in feature_list]
        x = torch.cat(feature_list, dim=1)
        x_max = torch.max(x, 2)[0].view(b, -1).unsqueeze(-1).repeat(1, 1, n)
        x_avg = torch.mean(x, 2).view(b, -1).unsqueeze(-1).repeat(1, 1, n)
        label = self.label_conv(cls_label.view(b, 16, 1)).repeat(1, 1, n)
        f_level_0 = self.propagation_0(pts.transpose(-1, -2), center.transpose(-1, -2),
                                       pts.transpose(-1, -2), x)
        x = torch.cat((f_level_0, torch.cat((x_max, x_avg, label), 1)), 1)
        x = self.dp1(self.relu(self.bns1(self.convs1(x))))
        x = self.convs3(self.relu(self.bns2(self.convs2(x))))
        return F.log_softmax(x, dim=1).permute(0, 2, 1)


def randomised(model: nn.Module) -> nn.Module:
    """Every weight and BatchNorm statistic moved away from its initial value; eval mode."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


def clouds(n: int = 2, points: int = 128) -> torch.Tensor:
    """Clouds in [-1, 1]^3 with no point within 0.05 of the origin (pointnet2_ops' FPS skips
    points with |p|^2 <= 1e-3; cd2p's FPS has no such exclusion)."""
    torch.manual_seed(7)
    pts = torch.rand(n, points, 3) * 2 - 1
    return torch.where(pts.norm(dim=-1, keepdim=True) < 0.05, pts + 0.1, pts)


def write_config(path, **model) -> None:
    """A config file in the projects' cfgs/*.yaml layout."""
    path.write_text(yaml.safe_dump({
        "optimizer": {"type": "AdamW", "kwargs": {"lr": 0.0005}},
        "dataset": {"train": {"_base_": "cfgs/dataset_configs/ModelNet40.yaml"}},
        "model": {"NAME": "PointTransformer", **model},
        "npoints": 128,
    }))  # fmt: skip


# -- conversions that reproduce the source's outputs ----------------------------------------------


def test_point_mae_classifier_gives_its_logits_with_settings_from_its_config(tmp_path):
    source = randomised(PointMAEClassifier(cls_dim=5))
    ckpt = tmp_path / "modelnet_finetuned.pth"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DDP run's keys
    torch.save({"base_model": state, "epoch": 300, "metrics": {"acc": 93.1}}, ckpt)
    config = tmp_path / "finetune_modelnet.yaml"
    write_config(config, trans_dim=DIM, depth=3, drop_path_rate=0.2, cls_dim=5,
                 num_heads=HEADS, group_size=SIZE, num_group=GROUPS, encoder_dims=DIM)
    names = tmp_path / "shape_names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", "point-mae", str(ckpt), str(out), "--config",
                                    str(config), "--class-names", str(names)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "point-mae (fine-tuned classifier)" in text and "assumed" not in text
    model = cd2p.from_pretrained(out)
    assert isinstance(model, Cd2pForClassification) and model.class_names == list("abcde")
    assert model.num_points == 128 and model.backbone.num_groups == GROUPS
    pts = clouds()
    with torch.no_grad():
        expected, got = source(pts), model(pts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    card = ModelCard.load(out / "README.md")
    converted = json.loads(safe_open(str(out / "model.safetensors"), "pt").metadata()[
        "cd2p_converted_from"])
    assert converted["settings"]["num_groups"] == {"value": GROUPS,
                                                   "source": "finetune_modelnet.yaml"}
    assert converted["assumed"] == [] and converted["dropped"] == []
    assert "finetune_modelnet.yaml" in card.text and "modelnet_finetuned.pth" in card.text


def test_point_bert_classifier_and_its_assumed_settings(tmp_path):
    source = randomised(PointMAEClassifier(cls_dim=4, point_bert=True))
    ckpt = tmp_path / "pointbert_mn40.pth"
    torch.save({"base_model": source.state_dict()}, ckpt)
    report = convert_point_mae(ckpt, tmp_path / "out", num_heads=HEADS, num_groups=GROUPS,
                               group_size=SIZE)  # fmt: skip
    assert report.layout == "point-bert (fine-tuned classifier)"
    assert report.config["head_norm"] is False and report.config["backbone"]["patch_dim"] == 256
    assert report.assumed == ["num_points"] and report.settings["num_points"]["value"] == 1024
    assert "assumed" in report.settings["num_points"]["source"]
    model = cd2p.from_pretrained(tmp_path / "out")
    pts = clouds()
    with torch.no_grad():
        torch.testing.assert_close(model(pts), source(pts), atol=1e-5, rtol=1e-4)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Assumed" in card and "num_points" in card


def test_point_mae_part_segmentation_gives_its_per_point_outputs(tmp_path):
    source = randomised(PointMAEPartSeg())
    ckpt = tmp_path / "best_model.pth"
    torch.save({"epoch": 200, "inctance_avg_iou": 0.86, "model_state_dict": source.state_dict(),
                "optimizer_state_dict": {"state": {}, "param_groups": []}}, ckpt)  # fmt: skip
    report = convert_point_mae(ckpt, tmp_path / "out", num_heads=HEADS, group_size=SIZE,
                               num_groups=16, num_points=128)  # fmt: skip
    assert report.layout == "point-mae (part segmentation)" and report.assumed == []
    assert any("ShapeNetPart" in note for note in report.notes)
    model = cd2p.from_pretrained(tmp_path / "out")
    assert model.feature_blocks == [4, 8, 12] and model.category_names == list(STANDARD_PARTS)
    pts, category = clouds(), torch.tensor([3, 15])
    with torch.no_grad():
        expected = source(pts.transpose(1, 2), F.one_hot(category, 16).float())
        got = model(pts, category).log_softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_point_bert_encoder_features_and_its_class_token_for_fine_tuning(tmp_path):
    source = randomised(PointBERTPretrain())
    ckpt = tmp_path / "Point-BERT.pth"
    torch.save({"base_model": source.state_dict(), "epoch": 300}, ckpt)
    report = convert_point_mae(ckpt, tmp_path / "out", num_heads=HEADS, num_groups=GROUPS,
                               group_size=SIZE)  # fmt: skip
    assert report.layout == "point-bert (pre-trained)"
    assert report.config["patch_dim"] == 256 and report.config["class_token"] is True
    assert {"queue", "queue_ptr", "transformer_q.mask_token", "transformer_q.lm_head.* (2 tensors)",
            "transformer_q.cls_head.* (4 tensors)"} <= set(report.dropped_summary)
    assert any(s.startswith(("transformer_k.* (", "dvae.* (")) for s in report.dropped_summary)
    backbone = Cd2pBackbone.from_pretrained(tmp_path / "out")
    pts = clouds()
    with torch.no_grad():
        expected = source.transformer_q(*Group(GROUPS, SIZE)(pts))
        out = backbone(pts)
    torch.testing.assert_close(out.class_token, expected[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.tokens, expected[:, 1:], atol=1e-5, rtol=1e-4)
    # Fine-tuning from it, as Point-BERT's load_model_from_ckpt: the pre-trained class token
    # and its position become the classifier's (its backbone has none of its own).
    classifier = Cd2pForClassification.from_backbone(backbone, num_classes=3)
    assert torch.equal(classifier.cls_token, source.transformer_q.cls_token)
    assert torch.equal(classifier.cls_pos, source.transformer_q.cls_pos)
    assert "cls_token" not in classifier.backbone.state_dict()
    assert classifier.backbone.reduce_dim.weight.shape == (DIM, 256)


def test_point_mae_pretrained_encoder_and_assumed_group_settings(tmp_path):
    source = randomised(PointMAEPretrain())
    ckpt = tmp_path / "pretrain.pth"
    torch.save({"base_model": source.state_dict(), "epoch": 300}, ckpt)
    res = CliRunner().invoke(main, ["convert", "point-mae", str(ckpt), str(tmp_path / "out"),
                                    "--num-heads", str(HEADS)])  # fmt: skip
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "point-mae (pre-trained)" in text and "2 (--num-heads)" in text
    assert "no option or --config): num_groups=64, group_size=32" in text
    assert "decoder_pos_embed.* (4 tensors)" in text and "increase_dim.* (2 tensors)" in text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Assumed" in card and "Point-MAE's cfgs/pretrain.yaml" in card
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_groups"] == 64 and "class_token" not in config and "patch_dim" not in config
    # With the right heads (from a config file) the features are Point-MAE's.
    cfg = tmp_path / "pretrain.yaml"
    write_config(cfg, group_size=SIZE, num_group=GROUPS,
                 transformer_config={"trans_dim": DIM, "num_heads": HEADS, "depth": 3})
    report = convert_point_mae(ckpt, tmp_path / "out2", config=cfg)
    assert report.assumed == []
    backbone = Cd2pBackbone.from_pretrained(tmp_path / "out2")
    pts = clouds()
    with torch.no_grad():
        expected = source.MAE_encoder(*Group(GROUPS, SIZE)(pts))
        torch.testing.assert_close(backbone(pts).tokens, expected, atol=1e-5, rtol=1e-4)


# -- refusals -------------------------------------------------------------------------------------


def test_conversions_that_cannot_reproduce_the_outputs_are_refused_with_the_reason(tmp_path):
    def refused(state, match, **kwargs):
        ckpt = tmp_path / "x.pth"
        torch.save({"base_model": state}, ckpt)
        with pytest.raises(ValueError, match=match):
            convert_point_mae(ckpt, tmp_path / "never", **{"num_heads": HEADS, **kwargs})
        assert not (tmp_path / "never").exists()

    cls = randomised(PointMAEClassifier()).state_dict()
    refused({**cls, "propagation_2.mlp_convs.0.weight": torch.zeros(1),
             "dgcnn_pro_1.knn": torch.zeros(1)}, "Point-BERT part-segmentation model")
    refused({**cls, "adapter.weight": torch.zeros(3)}, r"no counterpart in cd2p: adapter")
    refused({**cls, "blocks.blocks.0.attn.qkv.bias": torch.zeros(3 * DIM)}, "qkv_bias=True")
    narrow = {k: v for k, v in cls.items()}
    narrow["encoder.second_conv.3.weight"] = torch.zeros(16, 512, 1)
    narrow["encoder.second_conv.3.bias"] = torch.zeros(16)
    refused(narrow, "no reduce_dim projection")
    odd_head = {k: v for k, v in cls.items() if not k.startswith("cls_head_finetune.1.")}
    refused(odd_head, "does not map onto Cd2pForClassification")
    config = tmp_path / "other.yaml"
    write_config(config, trans_dim=384, num_heads=6)
    refused(cls, "says trans_dim 384 but .* 32: the config file is not this checkpoint's",
            config=config)
    refused(cls, "not divisible by num_heads 5", num_heads=5)


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    state = randomised(MaskTransformer()).state_dict()
    evil = tmp_path / "evil.pth"
    torch.save({"base_model": state, "args": NotATensor()}, evil)
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
    torch.save({"base_model": state}, other)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_point_mae(other, tmp_path / "taken", num_heads=2)
    res = CliRunner().invoke(main, ["convert", "point-bert", str(evil), str(tmp_path / "o")])
    assert res.exit_code == 1 and "Traceback" not in res.output and "refuses" in res.output


# -- ClipCap --------------------------------------------------------------------------------------


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
