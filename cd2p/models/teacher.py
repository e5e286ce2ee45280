"""The frozen 2D teacher: CLIP ViT-B/32 image encoder + ClipCap's MLP mapper
(docs/method.md#teacher).

The teacher turns an RGB frame into the target the student learns to reproduce:

* ``"prefix"``: CLIP's un-normalised image embedding ``(B, 512)`` through ClipCap's
  Conceptual-Captions MLP mapper, reshaped to the semantic prefix ``P (B, 10, 768)``;
* ``"clip"``: the CLIP embedding itself as one token ``(B, 1, 512)`` (ablation without the
  caption model).

It is frozen (no parameter ever requires a gradient), always in eval mode and always computes
in fp32, also inside an autocast region. Weights come from the standard open_clip download and
ClipCap's released ``conceptual_weights.pt`` on the Hugging Face Hub, or from local files;
``Teacher.random`` builds the same architecture with seeded random weights for tests and the
offline demo, and says so in ``description``.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image
from torch import nn

DEFAULT_MODEL_NAME = "ViT-B-32-quickgelu"
CLIP_PRETRAINED_TAG = "openai"
# ClipCap (Mokady et al. 2021) Conceptual-Captions weights with the MLP mapper, as published on
# the Hub by the ClipCap demo (the file the authors released on Google Drive, unchanged).
CLIPCAP_REPO_ID = "akhaliq/CLIP-prefix-captioning-conceptual-weights"
CLIPCAP_FILENAME = "conceptual_weights.pt"

TARGETS = ("prefix", "clip")
CLIP_DIM = 512
PREFIX_LENGTH = 10
GPT2_DIM = 768
IMAGE_SIZE = 224

_CLIPCAP_PREFIX = "clip_project."
_FETCH_HELP = (
    "To run without network access, supply local files: --clip-weights PATH (an open_clip "
    f"checkpoint of {DEFAULT_MODEL_NAME}, e.g. open_clip_model.safetensors from the Hub repo "
    "timm/vit_base_patch32_clip_224.openai) and --clipcap-weights PATH (ClipCap's "
    f"{CLIPCAP_FILENAME} from {CLIPCAP_REPO_ID}); in Python pass "
    "Teacher.from_pretrained(clip_weights=..., clipcap_weights=...). "
    "Or use --random-teacher (random weights, NOT CLIP) for a pipeline test."
)


class TeacherWeightsError(RuntimeError):
    """The teacher's weights could not be fetched or loaded."""


class ClipCapMapper(nn.Module):
    """ClipCap's MLP mapper with ClipCap's parameter layout (``model.0``, ``model.2``).

    ``(B, 512)`` CLIP image embedding -> Linear 512->3840, Tanh, Linear 3840->7680 ->
    ``(B, 10, 768)`` semantic prefix (10 GPT-2 token embeddings).
    """

    def __init__(
        self, clip_dim: int = CLIP_DIM, prefix_length: int = PREFIX_LENGTH, gpt_dim: int = GPT2_DIM
    ) -> None:
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt_dim = gpt_dim
        out = prefix_length * gpt_dim
        hidden = out // 2
        self.model = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``embedding (B, 512)`` -> prefix ``(B, prefix_length, gpt_dim)``."""
        return self.model(embedding).view(-1, self.prefix_length, self.gpt_dim)


def _read_clipcap_state(path: Path) -> dict[str, Any]:
    """The raw ``{key: value}`` of a ClipCap file (``.pt`` pickle or ``.safetensors``)."""
    if not path.is_file():
        raise FileNotFoundError(f"ClipCap weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from cd2p._reading import reading

        with reading(path, "download or convert the ClipCap weights again"):
            return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickles that would execute or build arbitrary Python objects.
        raise ValueError(
            f"{path} is not a plain tensor state dict: it contains pickled Python objects that "
            "cd2p refuses to load (torch.load(weights_only=True) rejected it). ClipCap's "
            f"{CLIPCAP_FILENAME} is a plain state dict; use that file, or re-save the tensors "
            f"as safetensors. Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors "
            "(ClipCap's file is a flat {name: tensor} dict)"
        )
    return dict(state)


def load_clipcap_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ClipCap checkpoint (``clip_project.*`` and ``gpt.*``), validated.

    Any value that is not a tensor (a set, a string, a number...) makes the file refused.
    """
    path = Path(path)
    state = _read_clipcap_state(path)
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise ValueError(
            f"{path} contains non-tensor objects (keys: {shown}); cd2p only loads state dicts "
            "made of tensors"
        )
    return state


def load_clipcap_mapper(path: str | Path) -> ClipCapMapper:
    """The ``clip_project.*`` MLP mapper of a ClipCap checkpoint, loaded strictly.

    ``path``: ClipCap's released ``conceptual_weights.pt`` (a pickled state dict, read with
    ``torch.load(weights_only=True)`` only) or a ``.safetensors`` file with the same keys.
    The ``gpt.*`` tensors are ignored here.
    """
    path = Path(path)
    state = load_clipcap_state(path)
    mapper = ClipCapMapper()
    expected = mapper.state_dict()
    kept = [key for key in state if key.startswith(_CLIPCAP_PREFIX)]  # gpt.* is for captions
    found = {key.removeprefix(_CLIPCAP_PREFIX): state[key] for key in kept}
    missing = sorted(_CLIPCAP_PREFIX + k for k in set(expected) - set(found))
    unexpected = sorted(_CLIPCAP_PREFIX + k for k in set(found) - set(expected))
    if missing or unexpected:
        lines = [f"{path} is not a ClipCap MLP-mapper checkpoint:"]
        if missing:
            lines.append(f"  missing keys: {', '.join(missing)}")
        if unexpected:
            lines.append(
                f"  unexpected keys: {', '.join(unexpected[:10])}"
                " (a transformer-mapper ClipCap checkpoint? the teacher uses the MLP mapper of "
                f"{CLIPCAP_FILENAME})"
            )
        raise ValueError("\n".join(lines))
    mismatched = [
        f"{_CLIPCAP_PREFIX}{k}: file {tuple(found[k].shape)} vs mapper {tuple(v.shape)}"
        for k, v in expected.items()
        if found[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(f"{path}: shape mismatches: {'; '.join(mismatched)}")
    mapper.load_state_dict({k: v.float() for k, v in found.items()}, strict=True)
    return mapper


def clip_transform(image_size: int = IMAGE_SIZE) -> Any:
    """CLIP's inference preprocessing (open_clip's own transform): resize the shorter side to
    ``image_size`` (bicubic), center crop, RGB, OpenAI mean/std. PIL image -> ``(3, S, S)``."""
    return open_clip.image_transform(
        image_size,
        is_train=False,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        interpolation="bicubic",
        resize_mode="shortest",
    )


def decode_image(image: Image.Image | bytes) -> Image.Image:
    """A PIL image from a PIL image or encoded image bytes (the pairs' JPEGs)."""
    if isinstance(image, Image.Image):
        return image
    return Image.open(io.BytesIO(image))


@contextmanager
def _quiet_open_clip():
    """open_clip logs its failures and 'initialized randomly' through the root logger; our own
    errors carry the cause and the random teacher says so in its description, so keep the CLI
    output to one clear message."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown teacher target {target!r}; choose one of {', '.join(TARGETS)}")


class Teacher(nn.Module):
    """Frozen CLIP image encoder (+ ClipCap mapper for ``target="prefix"``), fp32, eval mode.

    ``forward(images (B, 3, 224, 224))`` -> ``(B, 10, 768)`` for ``"prefix"`` or
    ``(B, 1, 512)`` for ``"clip"``. Build it with ``Teacher.from_pretrained`` or
    ``Teacher.random``; ``preprocess`` turns PIL images / JPEG bytes into the input batch.
    """

    def __init__(
        self,
        visual: nn.Module,
        mapper: ClipCapMapper | None,
        target: str,
        description: str,
        is_random: bool,
        image_size: int = IMAGE_SIZE,
        clip_description: str | None = None,
    ) -> None:
        super().__init__()
        _check_target(target)
        if (target == "prefix") != (mapper is not None):
            raise ValueError("target 'prefix' needs the ClipCap mapper; 'clip' must not have one")
        self.visual = visual
        self.mapper = mapper
        self.target = target
        self.description = description
        # What computes the "clip" target alone (the CLIP tower, without the mapper): the
        # targets files of "clip" name it, whichever teacher wrote them.
        self.clip_description = clip_description or description
        self.is_random = is_random
        self.image_size = image_size
        self._transform = clip_transform(image_size)
        self.float()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """Always eval mode: a parent's ``.train()`` must not switch the teacher."""
        return super().train(False)

    @property
    def target_shape(self) -> tuple[int, int]:
        """``(T, C)`` of one target: ``(10, 768)`` for ``"prefix"``, ``(1, 512)`` for ``"clip"``."""
        return target_shape(self.target)

    @property
    def available_targets(self) -> tuple[str, ...]:
        """The targets one pass can give: ``("prefix", "clip")`` with the mapper, else
        ``("clip",)``."""
        return ("prefix", "clip") if self.mapper is not None else ("clip",)

    def target_description(self, target: str) -> str:
        """What computes ``target``: the whole teacher for ``"prefix"``, CLIP alone for
        ``"clip"`` (so that CLIP targets of a prefix teacher and of a clip teacher with the
        same weights are recognised as the same)."""
        self._check_available(target)
        return self.description if target == "prefix" else self.clip_description

    def _check_available(self, target: str) -> None:
        _check_target(target)
        if target not in self.available_targets:
            raise ValueError(
                f"this teacher (target {self.target!r}) has no ClipCap mapper: it cannot "
                f"compute {target!r} targets"
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images: Sequence[Image.Image | bytes]) -> torch.Tensor:
        """PIL images or encoded (JPEG) bytes -> CLIP input batch ``(B, 3, 224, 224)`` on CPU."""
        return torch.stack([self._transform(decode_image(image)) for image in images])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, 224, 224)`` (preprocessed) -> targets ``(B, T, C)`` in fp32."""
        # The fp32 reference holds even when called inside the student's bf16 autocast.
        with torch.autocast(device_type=images.device.type, enabled=False):
            embedding = self.visual(images.float())  # (B, 512), un-normalised encode_image
            if self.mapper is None:
                return embedding[:, None, :]
            return self.mapper(embedding)

    @torch.no_grad()
    def compute(self, images: torch.Tensor, targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """Several targets from **one** CLIP pass: ``images (B, 3, 224, 224)`` ->
        ``{"clip": (B, 1, 512), "prefix": (B, 10, 768)}`` (the names asked for), fp32."""
        for name in targets:
            self._check_available(name)
        with torch.autocast(device_type=images.device.type, enabled=False):
            embedding = self.visual(images.float())  # (B, 512), un-normalised encode_image
            out: dict[str, torch.Tensor] = {}
            for name in targets:
                out[name] = embedding[:, None, :] if name == "clip" else self.mapper(embedding)
            return out

    def extra_repr(self) -> str:
        return f"target={self.target!r}, description={self.description!r}"

    @classmethod
    def from_pretrained(
        cls,
        target: str = "prefix",
        clip_weights: str | Path | None = None,
        clipcap_weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        model_name: str = DEFAULT_MODEL_NAME,
        cache_dir: str | Path | None = None,
    ) -> Teacher:
        """The real teacher.

        ``clip_weights``: a local open_clip checkpoint of ``model_name`` (state dict in
        ``.safetensors``/``.bin``/``.pt``); default: open_clip's pretrained ``"openai"``
        weights through its standard download and cache. ``clipcap_weights``: a local ClipCap
        file (see ``load_clipcap_mapper``); default: ``CLIPCAP_FILENAME`` from the Hub repo
        ``CLIPCAP_REPO_ID`` through the standard Hugging Face cache (only for ``"prefix"``).
        ``cache_dir`` overrides both download caches. Raises ``TeacherWeightsError`` with
        instructions when the weights cannot be fetched.
        """
        _check_target(target)
        model, clip_source = load_clip_model(model_name, clip_weights, cache_dir)
        clip_description = f"CLIP {model_name} ({clip_source})"
        description = clip_description
        mapper = None
        if target == "prefix":
            path = Path(clipcap_weights) if clipcap_weights else fetch_clipcap(cache_dir)
            mapper = load_clipcap_mapper(path)
            description += f" + ClipCap MLP mapper ({path.name})"
        teacher = cls(
            model.visual, mapper, target, description, False, clip_description=clip_description
        )
        return teacher.to(device)

    @classmethod
    def random(
        cls,
        target: str = "prefix",
        seed: int = 0,
        model_name: str = DEFAULT_MODEL_NAME,
        device: str | torch.device = "cpu",
    ) -> Teacher:
        """The teacher's architecture with seeded random weights (NOT CLIP): tests and demo."""
        _check_target(target)
        # A private RNG stream: the same seed gives the same weights, and the caller's global
        # RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with _quiet_open_clip():
                model = open_clip.create_model(model_name, pretrained=None)
            mapper = ClipCapMapper() if target == "prefix" else None
        clip_description = random_clip_description(seed, model_name)
        description = clip_description
        if mapper is not None:
            description = clip_description[:-1] + " + ClipCap MLP mapper)"
        teacher = cls(
            model.visual, mapper, target, description, True, clip_description=clip_description
        )
        return teacher.to(device)


def target_shape(target: str) -> tuple[int, int]:
    """``(T, C)`` of one target: ``(10, 768)`` for ``"prefix"``, ``(1, 512)`` for ``"clip"``."""
    _check_target(target)
    return (PREFIX_LENGTH, GPT2_DIM) if target == "prefix" else (1, CLIP_DIM)


def random_clip_description(seed: int, model_name: str = DEFAULT_MODEL_NAME) -> str:
    """How a seeded random CLIP (``Teacher.random``, the random text tower) is described."""
    return f"RANDOM teacher (seed {seed}) — not CLIP ({model_name} architecture)"


def random_clip_model(seed: int, model_name: str = DEFAULT_MODEL_NAME) -> nn.Module:
    """open_clip's ``model_name`` (both towers) with weights drawn from ``seed`` in a private
    RNG stream (the caller's RNG is untouched): the same seed gives the same weights as
    ``Teacher.random``'s image tower."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet_open_clip():
            return open_clip.create_model(model_name, pretrained=None)


def load_clip_model(
    model_name: str = DEFAULT_MODEL_NAME,
    clip_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[nn.Module, str]:
    """open_clip's whole ``model_name`` (image and text towers) with pretrained weights, and
    their source: a local state dict (``clip_weights``, loaded with ``weights_only=True``) or
    open_clip's ``openai`` download. Raises ``TeacherWeightsError`` (with how to pass local
    files) when the download fails."""
    if clip_weights is not None:
        path = Path(clip_weights)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights file not found: {path}")
        try:
            with _quiet_open_clip():
                model = open_clip.create_model(model_name, pretrained=str(path), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} contains pickled Python objects, not only tensors; cd2p loads CLIP "
                "checkpoints with weights_only=True (an OpenAI TorchScript .pt archive is not "
                "supported: use open_clip's open_clip_model.safetensors)"
            ) from exc
        except RuntimeError as exc:  # strict load_state_dict: missing/unexpected/mis-shaped keys
            raise ValueError(f"{path} is not a {model_name} open_clip checkpoint: {exc}") from exc
        return model, path.name
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(
                model_name,
                pretrained=CLIP_PRETRAINED_TAG,
                cache_dir=None if cache_dir is None else str(cache_dir),
                require_pretrained=True,
            )
    except RuntimeError as exc:
        raise TeacherWeightsError(
            f"could not fetch the CLIP weights (open_clip {model_name}, pretrained "
            f"'{CLIP_PRETRAINED_TAG}'): {exc}\n{_FETCH_HELP}"
        ) from exc
    return model, f"pretrained {CLIP_PRETRAINED_TAG}"


def fetch_clipcap(cache_dir: str | Path | None = None) -> Path:
    """ClipCap's ``conceptual_weights.pt`` from the Hub, through the standard HF cache."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                CLIPCAP_REPO_ID,
                CLIPCAP_FILENAME,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        )
    except Exception as exc:  # offline, network, auth or missing-file errors: all say the same
        raise TeacherWeightsError(
            f"could not fetch the ClipCap weights ({CLIPCAP_FILENAME} from the Hugging Face "
            f"repo {CLIPCAP_REPO_ID}): {type(exc).__name__}: {exc}\n{_FETCH_HELP}"
        ) from exc
