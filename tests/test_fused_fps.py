"""The fused Triton FPS gives the torch reference's indices (run on the CPU by Triton's
interpreter in a subprocess: ``TRITON_INTERPRET`` must be set before Triton is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cd2p.ops.fps_triton import triton_available

SCRIPT = textwrap.dedent(
    """
    import torch
    from cd2p.ops.fps_triton import fps_triton
    from cd2p.ops.sampling import _fps_torch

    g = torch.Generator().manual_seed(0)
    cases = []
    for batch, n, m in ((1, 1, 1), (2, 37, 37), (3, 500, 64), (2, 2500, 128)):
        cloud = torch.rand(batch, n, 3, generator=g) * 4 - 2
        cases.append((cloud, m))
    dup = torch.rand(2, 600, 3, generator=g)
    dup[:, 300:] = dup[:, :300]  # every point twice: ties everywhere
    cases.append((dup, 100))
    grid = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij"), -1)
    cases.append((grid.reshape(1, -1, 3).repeat(2, 1, 1), 50))  # exactly equal distances
    cases.append((torch.zeros(1, 40, 3), 10))  # all points identical
    for cloud, m in cases:
        for start in (torch.zeros(len(cloud), dtype=torch.long),
                      torch.randint(cloud.shape[1], (len(cloud),), generator=g)):
            fused = fps_triton(cloud, m, start)
            reference = _fps_torch(cloud, m, start)
            assert torch.equal(fused, reference), (cloud.shape, m, start)
    print("ok", len(cases))
    """
)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_fused_fps_equals_the_torch_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("ok 7")
