"""One GPU session, measured: the device's ceilings, the paper's pre-training step (eager and
compiled), FPS / kNN at the pre-training and detection shapes (torch vs fused), and the real
trainer end to end. Built to fit a short device lease.

    python benchmarks/gpu.py                      # on a CUDA machine; results in $OUT or ./gpu-out
    python benchmarks/gpu.py --deadline 600       # stop starting new measurements after 600 s
    python benchmarks/gpu.py --smoke              # tiny sizes on the CPU (what the test runs)

Every result is appended to ``$OUT/gpu.jsonl`` (one JSON object a line) as soon as it exists, so
a lease that ends early still leaves everything measured so far; a table is printed last.
Sections, in order (the cheapest and most telling first):

1. ``environment``: GPU, torch, CUDA, Triton;
2. ``ceiling``: bf16 matmul TFLOP/s and device-to-device copy GB/s (what "fast" means here);
3. ``step``: the paper's step (12 x 384, 64 x 32 patches of 4096 points, 32 concepts, stored
   targets, batch 128, bf16) in eager mode and compiled (and ``reduce-overhead``): ms per step,
   samples/s, peak memory, kernels launched and host syncs per step (from the profiler), the
   attention kernel used;
4. ``ops``: FPS and kNN at 128 x 4096 -> 64 and 8 x 40 000 -> 2048, the pure-torch FPS against
   the fused Triton kernel (same indices checked);
5. ``trainer``: ``run_pretrain`` on synthetic pairs with loader workers, steady state (the last
   logged window).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

START = time.perf_counter()


class Session:
    """Appends results to ``gpu.jsonl`` as they come and skips work past the deadline."""

    def __init__(self, out: Path, deadline: float) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu.jsonl"
        self.path.write_text("")
        self.deadline = deadline
        self.rows: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - START)

    def record(self, kind: str, **values: Any) -> dict[str, Any]:
        row = {"kind": kind, "t": round(time.perf_counter() - START, 2), **values}
        self.rows.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()
        print(json.dumps(row, default=str), flush=True)
        return row

    def run(self, kind: str, name: str, needs: float, fn: Callable[[], dict[str, Any]]) -> None:
        """Run ``fn`` when at least ``needs`` seconds remain; record its result or its error
        (a failing section never stops the ones after it)."""
        if self.left() < needs:
            self.record(kind, name=name, skipped=f"deadline: {self.left():.0f} s left")
            return
        try:
            self.record(kind, name=name, **fn())
        except Exception as exc:  # noqa: BLE001  (report and go on)
            self.record(kind, name=name, error=f"{type(exc).__name__}: {exc}",
                        trace=traceback.format_exc()[-1500:])  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls (steady state, not start-up)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# -- 1, 2: environment and ceilings -----------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "cpu": platform.processor() or platform.machine()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count)  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def ceilings(device: torch.device, smoke: bool) -> dict[str, Any]:
    n = 512 if smoke else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, 5 if smoke else 20)
    buf = torch.empty(64 * 2**20 if not smoke else 2**20, device=device, dtype=torch.uint8)
    dst = torch.empty_like(buf)
    copy = timed(lambda: dst.copy_(buf), device, 5 if smoke else 20)
    return {"matmul": f"{n}^3 {str(dtype)[6:]}", "tflops": round(2 * n**3 / seconds / 1e12, 2),
            "copy_gb_per_s": round(2 * buf.numel() / copy / 1e9, 1)}  # fmt: skip


# -- 3: the paper's step ----------------------------------------------------------------------


def paper_recipe(smoke: bool, device: torch.device, *extra: str):
    from cd2p.config import apply_overrides, load_recipe

    sizes = (["model.dim=32", "model.depth=2", "model.num_heads=2", "model.num_groups=16",
              "model.group_size=8", "data.num_points=256", "data.batch_size=4"]
             if smoke else ["data.batch_size=128"])  # fmt: skip
    return apply_overrides(load_recipe("pretrain-scannet"),
                           [*sizes, f"run.device={device}", *extra])  # fmt: skip


def profile_step(step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """Kernels launched, host syncs and the attention kernels of one step (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])  # fmt: skip
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        names = [e.name for e in kernels]
    else:
        names = [e.name for e in events if e.name.startswith("aten::")]
    syncs = sum(e.name in ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
                or ("Memcpy DtoH" in e.name) for e in events)  # fmt: skip
    attention = sorted({n for n in names if any(k in n.lower() for k in
                        ("flash", "fmha", "efficient_attention", "cudnn_sdpa",
                         "scaled_dot_product"))})  # fmt: skip
    return {"kernels_per_step": len(names), "host_syncs_per_step": int(syncs),
            "attention_kernels": attention[:4]}  # fmt: skip


def step_measure(smoke: bool, device: torch.device, mode: str) -> dict[str, Any]:
    """One training step of the paper's model: eager, or compiled with ``mode``."""
    from cd2p.engine.augment import step_generator
    from cd2p.engine.pretrain import PrepareBatch, PretrainStep, build_pretrain_model
    from cd2p.engine.trainer import StepContext, build_optimizer, default_param_groups

    recipe = paper_recipe(smoke, device)
    torch.manual_seed(0)
    step = PretrainStep(build_pretrain_model(recipe)).to(device).train()
    if mode != "eager":
        # smoke runs dynamo's capture without code generation (no compiler needed on a CPU)
        kwargs = {"backend": "eager"} if smoke else ({} if mode == "default" else {"mode": mode})
        step.model.compile(**kwargs)
    optimizer = build_optimizer(default_param_groups(step, 0.05), "adamw", 1e-4, (0.9, 0.999),
                                device)  # fmt: skip
    prepare = PrepareBatch(recipe)
    batch_size, pool = recipe.data.batch_size, recipe.data.num_points
    host = {"points": torch.randn(batch_size, pool, 3).pin_memory() if device.type == "cuda"
            else torch.randn(batch_size, pool, 3),
            "target": torch.randn(batch_size, 10, 768).half()}  # fmt: skip
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    counter = {"step": 0}

    def one() -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        ctx = StepContext(step=counter["step"], epoch=0, rank=0, device=device,
                          generator=step_generator(0, counter["step"], device=device))
        counter["step"] += 1
        with torch.no_grad():
            batch = prepare(batch, ctx)
        with amp:
            loss = step(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(step.parameters(), 10.0)
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_start = time.perf_counter()
    one()  # the first step compiles
    sync(device)
    first = time.perf_counter() - compile_start
    seconds = timed(one, device, 3 if smoke else 20, warmup=1 if smoke else 5)
    result = {"mode": mode, "batch": batch_size, "points": pool, "first_step_s": round(first, 2),
              "ms_per_step": round(1000 * seconds, 2),
              "samples_per_s": round(batch_size / seconds, 1)}  # fmt: skip
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result.update(profile_step(one, device))
    return result


# -- 4: geometry ------------------------------------------------------------------------------


def ops_measure(smoke: bool, device: torch.device, batch: int, n: int, m: int) -> dict[str, Any]:
    from cd2p.ops.neighbors import knn
    from cd2p.ops.sampling import _fps_torch

    points = torch.rand(batch, n, 3, device=device) * 4
    start = torch.zeros(batch, dtype=torch.long, device=device)
    repeats = 3 if smoke else 10
    result: dict[str, Any] = {"shape": f"{batch} x {n} -> {m}"}
    result["fps_torch_ms"] = round(1000 * timed(lambda: _fps_torch(points, m, start), device,
                                                repeats, warmup=1), 2)  # fmt: skip
    reference = _fps_torch(points, m, start)
    if device.type == "cuda":
        from cd2p.ops.fps_triton import fps_triton

        fused_ms = timed(lambda: fps_triton(points, m, start), device, repeats, warmup=1)
        result["fps_fused_ms"] = round(1000 * fused_ms, 2)
        result["fps_speedup"] = round(result["fps_torch_ms"] / result["fps_fused_ms"], 1)
        result["same_indices"] = bool(torch.equal(fps_triton(points, m, start), reference))
    centers = points.gather(1, reference.unsqueeze(-1).expand(-1, -1, 3))
    result["knn_ms"] = round(1000 * timed(lambda: knn(centers, points, 32, validate=False),
                                          device, repeats, warmup=1), 2)  # fmt: skip
    return result


# -- 5: the trainer ---------------------------------------------------------------------------


def trainer_measure(smoke: bool, device: torch.device, workers: int) -> dict[str, Any]:
    from cd2p.data.pairs import scene_dirs, target_file
    from cd2p.data.scannet_pairs import prepare_scannet
    from cd2p.data.synthetic import generate_synthetic_scannet
    from cd2p.data.teacher_targets import write_targets
    from cd2p.engine.metrics_log import read_metrics
    from cd2p.engine.pretrain import run_pretrain

    recipe = paper_recipe(smoke, device)
    steps = 4 if smoke else 60
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scenes = 2 if smoke else 12
        generate_synthetic_scannet(root / "raw", num_scenes=scenes,
                                   frames_per_scene=8 if smoke else 24, seed=0)  # fmt: skip
        prepare_scannet(root / "raw", root / "pairs", frame_skip=1, split="all", progress=False,
                        num_points=recipe.data.num_points, min_valid_points=10,
                        workers=min(8, os.cpu_count() or 1))  # fmt: skip
        for scene in scene_dirs(root / "pairs"):
            from datasets import load_from_disk

            rows = len(load_from_disk(str(scene)))
            write_targets(target_file(scene, "prefix"), torch.randn(rows, 10, 768),
                          {"teacher": "benchmark: random numbers", "random_teacher": "true"})
        from cd2p.config import apply_overrides

        recipe = apply_overrides(recipe, [
            f"schedule.max_steps={steps}", f"run.log_every={max(1, steps // 3)}",
            "run.checkpoint_every=100000", f"data.num_workers={workers}",
            "schedule.warmup_epochs=0", f"data.batch_size={min(recipe.data.batch_size, 16)}"
            if smoke else "data.batch_size=128",
        ])  # fmt: skip
        run_pretrain(recipe, [root / "pairs"], root / "run", progress=False)
        last = read_metrics(root / "run", "train")[-1]
    return {"steps": steps, "workers": workers, "samples_per_s": round(last["samples_per_s"], 1),
            "data_fraction": round(last["data_fraction"], 3),
            "peak_memory_mb": round(last["peak_memory_mb"])}  # fmt: skip


# -- the session ------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        shown = {k: v for k, v in row.items() if k not in ("t", "trace")}
        lines.append(" | ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--deadline", type=float, default=660.0,
                        help="start no measurement after this many seconds")  # fmt: skip
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    session = Session(Path(args.out), args.deadline)
    workers = args.workers if args.workers is not None else (0 if smoke else 8)

    session.run("environment", "machine", 0, lambda: environment(device))
    session.run("ceiling", "matmul and copy", 10, lambda: ceilings(device, smoke))
    for mode in ("eager", "default", "reduce-overhead"):
        if smoke and mode == "reduce-overhead":
            continue
        session.run("step", f"paper step, {mode}", 30 if smoke else 120,
                    lambda mode=mode: step_measure(smoke, device, mode))  # fmt: skip
    shapes = ((2, 512, 16), (1, 2000, 64)) if smoke else ((128, 4096, 64), (8, 40_000, 2048))
    for batch, n, m in shapes:
        session.run("ops", f"fps/knn {batch}x{n}->{m}", 10 if smoke else 60,
                    lambda b=batch, n=n, m=m: ops_measure(smoke, device, b, n, m))  # fmt: skip
    session.run("trainer", "run_pretrain end to end", 30 if smoke else 180,
                lambda: trainer_measure(smoke, device, workers))  # fmt: skip
    print("\n" + table(session.rows))
    print(f"\nresults: {session.path}")


if __name__ == "__main__":
    main()
