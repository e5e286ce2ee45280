"""The frozen teacher: shapes, freezing, ClipCap/CLIP weight files, offline errors, preprocessing.

Weights are real files the tests write in the real formats (ClipCap's pickled state dict, an
open_clip state dict) from a tiny open_clip config registered for the test, so the real
loading code runs without the 600 MB downloads.
"""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cd2p.models.teacher import (
    ClipCapMapper,
    Teacher,
    TeacherWeightsError,
    load_clipcap_mapper,
)

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD)


def clipcap_state(mapper: ClipCapMapper) -> dict[str, torch.Tensor]:
    """A state dict in the layout of ClipCap's released conceptual_weights.pt."""
    state = {f"clip_project.{k}": v.clone() for k, v in mapper.state_dict().items()}
    state["gpt.transformer.wte.weight"] = torch.randn(64, 768)
    state["gpt.transformer.h.0.attn.c_attn.weight"] = torch.randn(768, 2304)
    state["gpt.lm_head.weight"] = torch.randn(64, 768)
    return state


class NotATensor:
    """Any custom Python object: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_teacher_is_frozen_with_documented_shapes(tiny_model_name):
    images = torch.randn(3, 3, 224, 224, requires_grad=True)
    for target, shape in (("prefix", (10, 768)), ("clip", (1, 512))):
        teacher = Teacher.random(target, seed=0, model_name=tiny_model_name)
        assert teacher.target_shape == shape
        assert sum(p.numel() for p in teacher.parameters()) > 0
        assert not any(p.requires_grad for p in teacher.parameters())
        teacher.train()  # a parent module's .train() must not switch the teacher
        assert not teacher.training and not any(m.training for m in teacher.modules())
        out = teacher(images)
        assert out.shape == (3, *shape) and out.dtype == torch.float32
        assert not out.requires_grad
        # fp32 reference even inside the student's bf16 autocast region
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert teacher(images).dtype == torch.float32
    assert (teacher.mapper is None) and isinstance(
        Teacher.random("prefix", 0, model_name=tiny_model_name).mapper, ClipCapMapper
    )
    with pytest.raises(ValueError, match="unknown teacher target"):
        Teacher.random("caption", 0, model_name=tiny_model_name)


def test_clipcap_mapper_layout():
    mapper = ClipCapMapper()
    shapes = {k: tuple(v.shape) for k, v in mapper.state_dict().items()}
    assert shapes == {
        "model.0.weight": (3840, 512), "model.0.bias": (3840,),
        "model.2.weight": (7680, 3840), "model.2.bias": (7680,),
    }
    assert isinstance(mapper.model[1], torch.nn.Tanh)
    assert mapper(torch.randn(4, 512)).shape == (4, 10, 768)


def test_random_teacher_deterministic_and_labelled(tiny_model_name):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = Teacher.random("prefix", seed=5, model_name=tiny_model_name)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = Teacher.random("prefix", seed=5, model_name=tiny_model_name)
    c = Teacher.random("prefix", seed=6, model_name=tiny_model_name)
    images = torch.randn(2, 3, 224, 224)
    assert torch.equal(a(images), b(images))
    assert not torch.allclose(a(images), c(images))
    assert a.is_random and "RANDOM teacher (seed 5) — not CLIP" in a.description
    assert "seed 6" in c.description


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_clipcap_file_gives_the_same_prefix(tmp_path, suffix):
    source = ClipCapMapper()
    path = tmp_path / f"conceptual_weights{suffix}"
    state = clipcap_state(source)
    if suffix == ".pt":
        torch.save(state, path)  # the released file is a pickled state dict
    else:
        save_file(state, str(path))
    mapper = load_clipcap_mapper(path)
    embedding = torch.randn(5, 512)
    with torch.no_grad():
        assert torch.equal(mapper(embedding), source(embedding))
    assert set(mapper.state_dict()) == {"model.0.weight", "model.0.bias", "model.2.weight",
                                        "model.2.bias"}


def test_clipcap_missing_or_foreign_keys_are_errors(tmp_path):
    state = clipcap_state(ClipCapMapper())
    del state["clip_project.model.2.bias"]
    path = tmp_path / "incomplete.pt"
    torch.save(state, path)
    missing = r"incomplete\.pt(.|\n)*missing keys: clip_project\.model\.2\.bias"
    with pytest.raises(ValueError, match=missing):
        load_clipcap_mapper(path)
    transformer = {"clip_project.transformer.layers.0.weight": torch.zeros(2),
                   "clip_project.linear.weight": torch.zeros(2)}
    torch.save(transformer, tmp_path / "transformer.pt")
    with pytest.raises(ValueError, match="transformer-mapper"):
        load_clipcap_mapper(tmp_path / "transformer.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_clipcap_mapper(tmp_path / "nowhere.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"garbage\.pt"):
        load_clipcap_mapper(tmp_path / "garbage.pt")


@pytest.mark.parametrize(
    ("intruder", "message"),
    [(NotATensor(), "pickled Python objects"), ({"a", "b"}, "non-tensor objects")],
    ids=["custom-class", "set"],
)
def test_pickle_with_non_tensor_objects_is_refused(tmp_path, intruder, message):
    state = clipcap_state(ClipCapMapper())
    state["gpt.extra"] = intruder
    path = tmp_path / "conceptual_weights.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message) as info:
        load_clipcap_mapper(path)
    assert str(path) in str(info.value)


def test_local_clip_weights_load_through_open_clip(tmp_path, tiny_model_name):
    torch.manual_seed(1)
    clip = open_clip.create_model(tiny_model_name).eval()
    mapper = ClipCapMapper()
    clip_pt, clip_st = tmp_path / "open_clip_pytorch_model.bin", tmp_path / "clip.safetensors"
    torch.save(clip.state_dict(), clip_pt)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_st))
    clipcap = tmp_path / "conceptual_weights.pt"
    torch.save(clipcap_state(mapper), clipcap)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        embedding = clip.encode_image(images)  # un-normalised, (2, 512)
        expected_prefix = mapper(embedding)

    prefix = Teacher.from_pretrained(
        "prefix", clip_weights=clip_pt, clipcap_weights=clipcap, model_name=tiny_model_name
    )
    assert not prefix.is_random and "conceptual_weights.pt" in prefix.description
    torch.testing.assert_close(prefix(images), expected_prefix, rtol=0, atol=0)
    as_clip = Teacher.from_pretrained("clip", clip_weights=clip_st, model_name=tiny_model_name)
    torch.testing.assert_close(as_clip(images), embedding[:, None, :], rtol=0, atol=0)
    assert not any(p.requires_grad for p in prefix.parameters())

    with pytest.raises(ValueError, match=r"conceptual_weights\.pt"):  # not a CLIP checkpoint
        Teacher.from_pretrained("clip", clip_weights=clipcap, model_name=tiny_model_name)


def test_offline_without_local_weights_says_how_to_supply_them(
    tmp_path, monkeypatch, tiny_model_name
):
    import huggingface_hub.constants as hf_constants

    empty = tmp_path / "empty-cache"
    empty.mkdir()
    for var in ("HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read these at import time: point the live values at the empty cache too
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(empty))

    with pytest.raises(TeacherWeightsError) as info:
        Teacher.from_pretrained("prefix")
    message = str(info.value)
    assert "CLIP weights" in message
    assert "--clip-weights PATH" in message and "--clipcap-weights PATH" in message

    clip_file = tmp_path / "clip.bin"
    torch.save(open_clip.create_model(tiny_model_name).state_dict(), clip_file)
    with pytest.raises(TeacherWeightsError) as info:
        Teacher.from_pretrained("prefix", clip_weights=clip_file, model_name=tiny_model_name)
    message = str(info.value)
    assert "ClipCap weights" in message and "conceptual_weights.pt" in message
    assert "--clipcap-weights PATH" in message
    assert list(empty.rglob("*.pt")) == [] and list(empty.rglob("*.safetensors")) == []
    # the "clip" target needs no ClipCap file at all
    Teacher.from_pretrained("clip", clip_weights=clip_file, model_name=tiny_model_name)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_preprocessing_is_clips(tiny_model_name):
    teacher = Teacher.random("clip", 0, model_name=tiny_model_name)
    data = _jpeg(Image.new("RGB", (320, 240), (200, 120, 40)))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    colour = decoded[0, 0]
    assert (decoded == colour).all()  # JPEG of a flat colour decodes flat
    batch = teacher.preprocess([data, Image.new("L", (240, 320), 90)])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    expected = (torch.tensor(colour, dtype=torch.float32) / 255 - MEAN) / STD
    torch.testing.assert_close(batch[0], expected[:, None, None].expand(3, 224, 224),
                               rtol=0, atol=1e-5)
    grey = (torch.full((3,), 90.0) / 255 - MEAN) / STD  # greyscale -> RGB
    torch.testing.assert_close(batch[1], grey[:, None, None].expand(3, 224, 224),
                               rtol=0, atol=1e-5)

    # center crop: a 448x224 image keeps columns 112..335; the red borders are cut away
    wide = np.zeros((224, 448, 3), np.uint8)
    wide[:, :112] = wide[:, 336:] = (255, 0, 0)
    wide[:, 112:336] = (0, 0, 255)
    out = teacher.preprocess([Image.fromarray(wide)])[0]
    blue = (torch.tensor([0.0, 0.0, 1.0]) - MEAN) / STD
    torch.testing.assert_close(out, blue[:, None, None].expand(3, 224, 224), rtol=0, atol=1e-5)

    # resize the shorter side to 224 with bicubic, then center crop: a portrait noise image
    noise = np.random.default_rng(0).integers(0, 256, (500, 300, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(noise).resize((224, 373), Image.BICUBIC))
    crop = torch.from_numpy(resized[74:298].astype(np.float32) / 255).permute(2, 0, 1)
    out = teacher.preprocess([Image.fromarray(noise)])[0]
    torch.testing.assert_close(out, (crop - MEAN[:, None, None]) / STD[:, None, None],
                               rtol=0, atol=1e-5)
