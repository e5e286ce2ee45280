"""Speed of the language uses of the student: captions (`cd2p caption`) and zero-shot
(`cd2p zeroshot`).

    .venv/bin/python benchmarks/language.py               # CPU (+ CUDA when present)
    .venv/bin/python benchmarks/language.py --tokens 67   # whole captions on CPU too (slow)

Measured, side by side in one run, with random weights of the real architectures (the cost
does not depend on the values):

* **caption decoding** with GPT-2 small (124 M, ClipCap's), ms per generated token and per
  caption: ClipCap's greedy ``generate2`` and ``generate_beam`` (5 beams) as cd2p reproduces
  them (GPT-2 re-run over the whole sequence at every step), and, for comparison only, a greedy
  decoder with a key/value cache (what exactness to ClipCap costs; cd2p does not ship it);
* **the student** of the paper's size (384-d x 12, 32 concepts, 4096 points): clouds per
  second for the prefix and CLIP embedding, and the pre-training preprocessing of a raw
  100 000-point cloud (voxel grid, sampling, centring);
* **zero-shot class embeddings**: CLIP ViT-B/32's text tower over 40 classes x 10 prompts.

Decoding runs for ``--tokens`` steps with no stop token, the steady-state worst case (ClipCap
stops at "." or 67 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

console = Console(width=150)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpt2_small(device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval().to(device)  # 124 M: ClipCap's GPT-2


@torch.no_grad()
def cached_greedy(gpt2, prefix: torch.Tensor, tokens: int) -> list[int]:
    """Greedy decoding with a key/value cache (comparison only: not ClipCap's computation)."""
    out = gpt2(inputs_embeds=prefix[None], use_cache=True)
    past, ids = out.past_key_values, []
    for _ in range(tokens):
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(int(next_id))
        out = gpt2(input_ids=next_id, past_key_values=past, use_cache=True)
        past = out.past_key_values
    return ids


def decoding_rows(device: torch.device, tokens: int, repeats: int) -> list[list[str]]:
    from cd2p.language.captioning import beam_tokens, greedy_tokens

    gpt2 = gpt2_small(device)
    prefix = torch.randn(10, 768, device=device)
    no_stop = -1  # never emitted: every caption runs for `tokens` steps
    runs = {
        "greedy (ClipCap generate2)": lambda: greedy_tokens(gpt2, prefix, no_stop, tokens),
        "beam 5 (ClipCap generate_beam)": lambda: beam_tokens(gpt2, prefix, no_stop, 5, tokens),
        "greedy with KV cache (not shipped)": lambda: cached_greedy(gpt2, prefix, tokens),
    }
    seconds = {name: best_of(fn, repeats, device) for name, fn in runs.items()}
    base = seconds["greedy (ClipCap generate2)"]
    return [
        [device.type, name, str(tokens), f"{1000 * s / tokens:.1f}", f"{s:.2f}",
         f"{base / s:.2f}x"]
        for name, s in seconds.items()
    ]  # fmt: skip


def student_rows(device: torch.device, repeats: int, batch: int) -> list[list[str]]:
    from cd2p.data.clouds import pretraining_view
    from cd2p.models.student import Cd2pStudent

    torch.manual_seed(0)
    student = Cd2pStudent(objective="distill+clip", num_points=4096).eval().to(device)
    points = torch.randn(batch, 4096, 3, device=device)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                             enabled=device.type == "cuda"):  # fmt: skip
            student(points)

    seconds = best_of(forward, repeats, device)
    raw = np.random.default_rng(0).random((100_000, 3)).astype(np.float32) * [5, 4, 3]
    prep = best_of(lambda: pretraining_view(raw, 4096, 0.02, 0), repeats, torch.device("cpu"))
    return [
        [device.type, f"student forward, batch {batch} x 4096 points", f"{batch / seconds:.1f}"
         + " clouds/s", f"{1000 * seconds / batch:.1f} ms per cloud"],
        [device.type, "pre-training view of a 100 000-point cloud (CPU)", f"{1 / prep:.1f}"
         + " clouds/s", f"{1000 * prep:.1f} ms per cloud"],
    ]  # fmt: skip


def text_rows(device: torch.device, repeats: int) -> list[list[str]]:
    from cd2p.language.zeroshot import DEFAULT_PROMPTS, ClipTextTower, class_embeddings

    tower = ClipTextTower.random(0, device=device)
    names = [f"class {i}" for i in range(40)]
    seconds = best_of(lambda: class_embeddings(tower, names, DEFAULT_PROMPTS), repeats, device)
    prompts = len(names) * len(DEFAULT_PROMPTS)
    return [[device.type, f"text tower: 40 classes x {len(DEFAULT_PROMPTS)} prompts",
             f"{prompts / seconds:.0f} prompts/s", f"{seconds:.2f} s in all"]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None,
                        help="decoding steps [default: 67 on CUDA, 16 on CPU]")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    decode = Table(title="caption decoding, GPT-2 small (124 M), prefix of 10 tokens")
    for column in ("device", "decoder", "tokens", "ms / token", "s / caption", "vs greedy"):
        decode.add_column(column)
    other = Table(title="student and text tower")
    for column in ("device", "what", "throughput", "time"):
        other.add_column(column)
    for device in devices:
        tokens = args.tokens or (67 if device.type == "cuda" else 16)
        for row in decoding_rows(device, tokens, args.repeats):
            decode.add_row(*row)
        for row in student_rows(device, args.repeats, 16 if device.type == "cuda" else 4):
            other.add_row(*row)
        for row in text_rows(device, args.repeats):
            other.add_row(*row)
    console.print(decode)
    console.print(other)


if __name__ == "__main__":
    main()
