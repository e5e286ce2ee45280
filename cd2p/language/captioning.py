"""Captions from semantic prefixes, decoded exactly as ClipCap's own ``predict.py`` does
(github.com/rmokady/CLIP_prefix_caption, docs/method.md#captioning).

A prefix ``(10, 768)`` (the teacher's, from an image, or the student's, from a point cloud)
enters GPT-2 as input embeddings; the caption grows one token at a time, every step running
GPT-2 over the whole sequence so far (no key/value cache, as ClipCap):

* :func:`greedy_tokens` is ClipCap's ``generate2``: the last position's logits divided by the
  temperature (1.0), a nucleus (top-p 0.8) filter that sets the logits outside the smallest
  set of tokens whose probability exceeds 0.8 to ``-inf`` (the most likely token always
  stays), then the argmax. It stops after the stop token ``"."`` (which is kept) or 67 tokens.
* :func:`beam_tokens` is ClipCap's ``generate_beam``: ``beam_size`` (5) beams scored by the
  sum of their tokens' log-probabilities (``softmax().log()``), ranked by that sum divided by
  their length; a stopped beam only extends with token 0 at no cost and no length. It stops
  when every beam has emitted ``"."`` or after 67 steps; captions are sorted by the
  length-normalised score.

The GPT-2 is ClipCap's fine-tuned one: from ``cd2p convert clipcap``'s output directory (or its
``gpt2/``), or from the ClipCap file itself (``conceptual_weights.pt``, read with
``torch.load(weights_only=True)``; by default the teacher's download). The tokenizer is GPT-2's
(``openai-community/gpt2`` from the Hub, or a local directory with ``vocab.json`` and
``merges.txt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cd2p.models.teacher import CLIPCAP_FILENAME, CLIPCAP_REPO_ID, TeacherWeightsError

DEFAULT_TOKENIZER = "openai-community/gpt2"
# ClipCap's predict.py settings.
STOP_TOKEN = "."
ENTRY_LENGTH = 67
TOP_P = 0.8
TEMPERATURE = 1.0
BEAM_SIZE = 5

_FETCH_HELP = (
    "To run without network access, supply local files: --tokenizer PATH (a directory with "
    f"GPT-2's vocab.json and merges.txt, e.g. a download of the Hub repo {DEFAULT_TOKENIZER}) "
    "and --gpt2 PATH (the output of `cd2p convert clipcap`, or ClipCap's "
    f"{CLIPCAP_FILENAME} from {CLIPCAP_REPO_ID}; --clipcap-weights PATH gives the same file "
    "to the teacher and the decoder). In Python pass Captioner.from_pretrained(gpt2=..., "
    "tokenizer=...)."
)


# -- loading ----------------------------------------------------------------------------------


def _looks_local(source: str | Path) -> bool:
    text = str(source)
    return isinstance(source, Path) or Path(text).exists() or text.startswith((".", "/", "~"))


def load_tokenizer(source: str | Path | None = None, cache_dir: str | Path | None = None) -> Any:
    """GPT-2's tokenizer (``transformers.GPT2Tokenizer``) from a local directory holding
    ``vocab.json`` and ``merges.txt`` (GPT-2's own files), or a Hub id (default
    ``openai-community/gpt2``, through the standard cache). Raises ``TeacherWeightsError``
    with how to pass local files when the download fails."""
    from transformers import GPT2Tokenizer

    source = source or DEFAULT_TOKENIZER
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"GPT-2 tokenizer directory not found: {path}")
        missing = [n for n in ("vocab.json", "merges.txt") if not (path / n).is_file()]
        if missing and not (path / "tokenizer.json").is_file():
            raise ValueError(
                f"{path} is not a GPT-2 tokenizer: {' and '.join(missing)} missing (GPT-2's "
                "tokenizer is vocab.json + merges.txt)"
            )
        try:
            tokenizer = GPT2Tokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - malformed files raise many types
            raise ValueError(f"{path}: cannot read this GPT-2 tokenizer: {exc}") from None
        return _checked(tokenizer, str(path))
    from huggingface_hub import hf_hub_download

    try:
        # GPT-2's own two files, fetched explicitly: transformers builds an EMPTY tokenizer,
        # without an error, when they are missing (offline with an empty cache).
        files = [
            hf_hub_download(
                str(source), name, cache_dir=None if cache_dir is None else str(cache_dir)
            )
            for name in ("vocab.json", "merges.txt")
        ]
    except Exception as exc:  # offline, network, auth or missing-repo errors: all say the same
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TeacherWeightsError(
            f"could not fetch the GPT-2 tokenizer ({source} from the Hugging Face Hub): "
            f"{type(exc).__name__}: {first}\n{_FETCH_HELP}"
        ) from exc
    return _checked(GPT2Tokenizer.from_pretrained(str(Path(files[0]).parent)), str(source))


def _checked(tokenizer: Any, where: str) -> Any:
    """A tokenizer with a vocabulary (transformers returns empty ones for missing files)."""
    if len(tokenizer) < 2:
        raise ValueError(f"{where}: the GPT-2 tokenizer loaded with an empty vocabulary")
    return tokenizer


def load_gpt2(source: str | Path | None = None, cache_dir: str | Path | None = None) -> nn.Module:
    """ClipCap's GPT-2 (``transformers.GPT2LMHeadModel``, fp32, eval mode, frozen).

    ``source``: a directory written by ``cd2p convert clipcap`` (or its ``gpt2/``), a
    ``transformers`` GPT-2 directory (safetensors only), or a ClipCap checkpoint file (its
    ``gpt.*`` tensors; ``.pt`` read with ``weights_only=True``, or ``.safetensors``). Default:
    ClipCap's ``conceptual_weights.pt`` through the teacher's download and cache.
    """
    from transformers import GPT2LMHeadModel

    from cd2p.convert import clipcap_gpt2
    from cd2p.models.teacher import fetch_clipcap, load_clipcap_state

    if source is None:
        try:
            path = fetch_clipcap(cache_dir)
        except TeacherWeightsError as exc:
            raise TeacherWeightsError(
                str(exc).split("\n")[0] + " (its GPT-2 decodes the captions)\n" + _FETCH_HELP
            ) from exc
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        directory = path / "gpt2" if (path / "gpt2" / "config.json").is_file() else path
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} holds no GPT-2: expected config.json and model.safetensors (a "
                "`transformers` directory) or the output of `cd2p convert clipcap`"
            )
        if not any(directory.glob("*.safetensors")):
            raise ValueError(
                f"{directory} has no .safetensors weights; cd2p loads GPT-2 directories in "
                "safetensors only (`cd2p convert clipcap` writes them)"
            )
        try:
            model = GPT2LMHeadModel.from_pretrained(str(directory), use_safetensors=True)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{directory}: cannot load this GPT-2: {exc}") from None
    elif path.is_file():
        model, _, _ = clipcap_gpt2(load_clipcap_state(path), path)
    else:
        raise FileNotFoundError(f"GPT-2 weights not found: {path}")
    model = model.float().eval()
    model.requires_grad_(False)
    return model


# -- ClipCap's decoding -----------------------------------------------------------------------


def stop_token_id(tokenizer: Any, stop_token: str = STOP_TOKEN) -> int:
    """The id of ``stop_token`` as ClipCap takes it: the first id of its encoding."""
    ids = tokenizer.encode(stop_token)
    if not ids:
        raise ValueError(f"the tokenizer encodes the stop token {stop_token!r} to nothing")
    return int(ids[0])


def _check_prefix(gpt2: nn.Module, prefix: torch.Tensor) -> torch.Tensor:
    width = gpt2.get_input_embeddings().weight.shape[1]
    if prefix.dim() != 2 or prefix.shape[1] != width:
        raise ValueError(
            f"a prefix must be (L, {width}) for this GPT-2 (its embedding width), got "
            f"{tuple(prefix.shape)}"
        )
    device = gpt2.get_input_embeddings().weight.device
    return prefix.detach().to(device, torch.float32)[None]  # (1, L, width)


def _last_logits(gpt2: nn.Module, embeds: torch.Tensor, temperature: float) -> torch.Tensor:
    """GPT-2 over the whole sequence so far; the last position's logits over the temperature."""
    logits = gpt2(inputs_embeds=embeds, use_cache=False).logits
    return logits[:, -1, :] / (temperature if temperature > 0 else 1.0)


@torch.no_grad()
def greedy_tokens(
    gpt2: nn.Module,
    prefix: torch.Tensor,
    stop_token: int,
    entry_length: int = ENTRY_LENGTH,
    top_p: float = TOP_P,
    temperature: float = TEMPERATURE,
) -> list[int]:
    """ClipCap's ``generate2`` for one prefix ``(L, D)``: the caption's token ids, the stop
    token included when it was reached."""
    embeds = _check_prefix(gpt2, prefix)
    wte = gpt2.get_input_embeddings()
    tokens: list[int] = []
    for _ in range(entry_length):
        logits = _last_logits(gpt2, embeds, temperature)  # (1, V)
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        # Shift right: the token that crosses top_p stays, and so does the most likely one.
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[:, sorted_indices[remove]] = -float("inf")
        next_token = torch.argmax(logits, -1).unsqueeze(0)  # (1, 1)
        tokens.append(int(next_token.item()))
        embeds = torch.cat((embeds, wte(next_token)), dim=1)
        if tokens[-1] == stop_token:
            break
    return tokens


@torch.no_grad()
def beam_tokens(
    gpt2: nn.Module,
    prefix: torch.Tensor,
    stop_token: int,
    beam_size: int = BEAM_SIZE,
    entry_length: int = ENTRY_LENGTH,
    temperature: float = TEMPERATURE,
) -> list[tuple[list[int], float]]:
    """ClipCap's ``generate_beam`` for one prefix ``(L, D)``: every beam's token ids (cut to
    its length) and length-normalised score, best first."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    embeds = _check_prefix(gpt2, prefix)
    wte = gpt2.get_input_embeddings()
    device = embeds.device
    tokens: torch.Tensor | None = None  # (beam, t)
    scores: torch.Tensor | None = None  # (beam,) summed log-probabilities
    lengths = torch.ones(beam_size, device=device)
    stopped = torch.zeros(beam_size, device=device, dtype=torch.bool)
    for _ in range(entry_length):
        # ClipCap takes log(softmax) (not log_softmax): kept for identical scores.
        logprobs = _last_logits(gpt2, embeds, temperature).softmax(-1).log()
        if scores is None:  # first step: the beams are the best first tokens
            scores, next_tokens = logprobs.topk(beam_size, -1)
            embeds = embeds.expand(beam_size, *embeds.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logprobs[stopped] = -float("inf")
            logprobs[stopped, 0] = 0  # a finished beam continues with token 0, at no cost
            summed = scores[:, None] + logprobs  # (beam, V)
            lengths[~stopped] += 1
            averaged = summed / lengths[:, None]
            averaged, flat = averaged.view(-1).topk(beam_size, -1)
            source = flat // summed.shape[1]
            lengths = lengths[source]
            next_tokens = (flat % summed.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            embeds = embeds[source]
            scores = averaged * lengths
            stopped = stopped[source]
        next_embeds = wte(next_tokens.squeeze()).view(embeds.shape[0], 1, -1)
        embeds = torch.cat((embeds, next_embeds), dim=1)
        stopped = stopped | next_tokens.eq(stop_token).squeeze()
        if stopped.all():
            break
    final = scores / lengths
    beams = [
        (row[: int(length)].tolist(), float(score))
        for row, length, score in zip(tokens.cpu(), lengths.cpu(), final.cpu(), strict=True)
    ]
    order = final.argsort(descending=True).tolist()
    return [beams[i] for i in order]


# -- the captioner ----------------------------------------------------------------------------


@dataclass
class Captioner:
    """ClipCap's GPT-2 and GPT-2's tokenizer: prefixes ``(B, L, 768)`` -> captions.

    ``caption(prefixes)`` decodes greedily (``generate2``); ``caption(prefixes, beam=5)`` with
    beam search (``generate_beam``), keeping the best caption.
    """

    gpt2: nn.Module
    tokenizer: Any
    description: str = ""

    @classmethod
    def from_pretrained(
        cls,
        gpt2: str | Path | None = None,
        tokenizer: str | Path | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
    ) -> Captioner:
        """Load the GPT-2 (:func:`load_gpt2`) and the tokenizer (:func:`load_tokenizer`)."""
        vocab = load_tokenizer(tokenizer, cache_dir)
        model = load_gpt2(gpt2, cache_dir).to(device)
        size = model.get_input_embeddings().weight.shape[0]
        if len(vocab) > size:
            raise ValueError(
                f"the tokenizer has {len(vocab)} tokens but the GPT-2 only {size}: they do not "
                "belong together"
            )
        where = "ClipCap's conceptual_weights.pt" if gpt2 is None else Path(gpt2).name
        return cls(model, vocab, f"GPT-2 from {where}, tokenizer {tokenizer or DEFAULT_TOKENIZER}")

    @property
    def prefix_width(self) -> int:
        """The width a prefix must have (GPT-2's embedding width, 768)."""
        return int(self.gpt2.get_input_embeddings().weight.shape[1])

    def caption(self, prefixes: torch.Tensor | Sequence[torch.Tensor], beam: int | None = None
                ) -> list[str]:  # fmt: skip
        """One caption per prefix ``(L, 768)`` of ``prefixes`` (``(B, L, 768)``)."""
        stop = stop_token_id(self.tokenizer)
        out = []
        for prefix in prefixes:
            if beam is None:
                ids = greedy_tokens(self.gpt2, prefix, stop)
            else:
                ids = beam_tokens(self.gpt2, prefix, stop, beam_size=beam)[0][0]
            out.append(self.tokenizer.decode(ids))
        return out


# -- captions of clouds and of pairs -----------------------------------------------------------


def caption_clouds(
    student: nn.Module,
    captioner: Captioner,
    clouds: Sequence[Any],
    beam: int | None = None,
    batch_size: int = 16,
    on_caption: Any = None,
) -> list[str]:
    """Captions of raw clouds (each ``(N, 3)``, metres, z up): each is prepared as in
    pre-training, the student predicts its prefix, GPT-2 decodes it. ``on_caption(i, text)``
    is called after each caption (progress)."""
    check_captioning_student(student)
    prefixes = student.encode(clouds, batch_size=batch_size).prefix
    out = []
    for index, prefix in enumerate(prefixes):
        out.append(captioner.caption(prefix[None], beam)[0])
        if on_caption is not None:
            on_caption(index, out[-1])
    return out


def check_captioning_student(student: nn.Module) -> None:
    """A student that predicts a prefix (not ``distill-clip``'s, which predicts CLIP only)."""
    if "prefix" not in getattr(student, "outputs", ()):
        raise ValueError(
            f"this model (kind {getattr(student, 'model_kind', '?')!r}, objective "
            f"{getattr(student, 'objective', '?')!r}) predicts no semantic prefix: captions need "
            "a cd2p student (RUN/student) pre-trained with distill, distill-no-concept, "
            "mae+distill or distill+clip"
        )


def spread_indices(total: int, limit: int) -> list[int]:
    """``limit`` indices spread evenly over ``range(total)`` (all of them when fewer)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if total <= limit:
        return list(range(total))
    if limit == 1:
        return [0]
    return sorted({round(i * (total - 1) / (limit - 1)) for i in range(limit)})


def caption_pairs(
    student: nn.Module,
    captioner: Captioner,
    teacher: nn.Module,
    pairs: Any,
    limit: int = 16,
    beam: int | None = None,
    on_caption: Any = None,
) -> list[Any]:
    """Teacher and student captions of ``limit`` pairs spread over ``pairs`` (a
    :class:`~cd2p.data.pairs.PairDataset` with images): the teacher (CLIP -> mapper) captions
    the RGB frame, the student the pair's points. Returns contact-sheet rows
    (:class:`~cd2p.language.contact_sheet.SheetEntry`)."""
    from cd2p.language.contact_sheet import SheetEntry

    check_captioning_student(student)
    if getattr(teacher, "target", None) != "prefix":
        raise ValueError("the teacher must compute prefixes (CLIP + ClipCap mapper)")
    entries = []
    for count, index in enumerate(spread_indices(len(pairs), limit)):
        item = pairs[index]
        points = item["points"].numpy()
        student_prefix = student.encode([points]).prefix
        images = teacher.preprocess([item["image"]]).to(teacher.device)
        teacher_prefix = teacher(images).float().cpu()
        entry = SheetEntry(
            title=f"{item['scene_id']} frame {item['frame_index']}",
            points=student.prepare_points(points).numpy(),
            student=captioner.caption(student_prefix, beam)[0],
            image=item["image"],
            teacher=captioner.caption(teacher_prefix, beam)[0],
        )
        entries.append(entry)
        if on_caption is not None:
            on_caption(count, entry)
    return entries


__all__ = [
    "BEAM_SIZE",
    "DEFAULT_TOKENIZER",
    "ENTRY_LENGTH",
    "STOP_TOKEN",
    "TOP_P",
    "Captioner",
    "beam_tokens",
    "caption_clouds",
    "caption_pairs",
    "check_captioning_student",
    "greedy_tokens",
    "load_gpt2",
    "load_tokenizer",
    "spread_indices",
    "stop_token_id",
]
