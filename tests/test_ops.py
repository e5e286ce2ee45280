import pytest
import torch

from cd2p.ops import (
    chamfer_distance,
    cluster_available,
    farthest_point_sample,
    group_points,
    index_points,
    knn,
    resolve_backend,
    three_nn_interpolate,
)


def brute_force_fps(points: torch.Tensor, m: int, start: int = 0) -> list[int]:
    """Textbook FPS on one cloud (N, 3): each pick maximises the distance to the chosen set."""
    chosen = [start]
    for _ in range(m - 1):
        d = torch.cdist(points, points[chosen]).min(dim=1).values
        chosen.append(int(d.argmax()))
    return chosen


def test_fps_matches_brute_force_and_picks_farthest():
    pts = torch.rand(3, 300, 3)
    idx = farthest_point_sample(pts, 32)
    assert idx.shape == (3, 32) and idx.dtype == torch.long
    for b in range(3):
        assert idx[b].tolist() == brute_force_fps(pts[b], 32)
        assert idx[b, 0] == 0  # deterministic first point
        # Every chosen point is (ties aside) the farthest from those chosen before it.
        for i in range(1, 32):
            d = torch.cdist(pts[b], pts[b, idx[b, :i]]).min(dim=1).values
            assert d[idx[b, i]] >= d.max() - 1e-6


def test_fps_random_start_is_seeded_and_distinct():
    pts = torch.rand(2, 100, 3)
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = farthest_point_sample(pts, 10, random_start=True, generator=g1)
    b = farthest_point_sample(pts, 10, random_start=True, generator=g2)
    assert torch.equal(a, b)
    assert all(len(set(row.tolist())) == 10 for row in a)
    assert a[0].tolist() == brute_force_fps(pts[0], 10, int(a[0, 0]))


def test_knn_matches_cdist_sort():
    queries, points = torch.rand(2, 50, 3), torch.rand(2, 400, 3)
    idx = knn(queries, points, 16, max_chunk_elements=2 * 7 * 400)  # forces several chunks
    ref = torch.cdist(queries, points).sort(dim=-1).indices[..., :16]
    assert idx.shape == (2, 50, 16)
    got_d = torch.gather(torch.cdist(queries, points), 2, idx)
    ref_d = torch.gather(torch.cdist(queries, points), 2, ref)
    torch.testing.assert_close(got_d, ref_d, atol=1e-5, rtol=0)
    # Indices agree wherever neighbours are not within float error of each other.
    assert (idx == ref).float().mean() > 0.99


def test_group_points_shapes_and_relative_coordinates():
    pts = torch.rand(2, 256, 3)
    g = group_points(pts, num_groups=16, group_size=8)
    assert g.neighborhoods.shape == (2, 16, 8, 3)
    assert g.centers.shape == (2, 16, 3)
    torch.testing.assert_close(g.centers, index_points(pts, g.center_idx))
    absolute = g.neighborhoods + g.centers.unsqueeze(2)
    torch.testing.assert_close(absolute, index_points(pts, g.neighbor_idx))
    # The nearest neighbour of each center is the center itself.
    assert torch.allclose(g.neighborhoods[:, :, 0], torch.zeros(2, 16, 3))


def test_three_nn_interpolate_against_reference():
    queries, known = torch.rand(2, 40, 3), torch.rand(2, 12, 3)
    feats = torch.randn(2, 12, 5)
    out = three_nn_interpolate(queries, known, feats)
    d = torch.cdist(queries, known).square()
    top = d.topk(3, largest=False)
    w = 1.0 / (top.values + 1e-8)
    w = w / w.sum(-1, keepdim=True)
    ref = (torch.gather(feats.unsqueeze(1).expand(-1, 40, -1, -1), 2,
                        top.indices.unsqueeze(-1).expand(-1, -1, -1, 5)) * w.unsqueeze(-1)).sum(2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # A query placed on a known point takes that point's features.
    on_known = three_nn_interpolate(known[:, :1], known, feats)
    torch.testing.assert_close(on_known[:, 0], feats[:, 0], atol=1e-4, rtol=1e-4)


def test_chamfer_distance_reference_and_gradient():
    a = torch.rand(2, 30, 3, requires_grad=True)
    b = torch.rand(2, 20, 3)
    d = torch.cdist(a, b).square()
    ref = (d.min(2).values.mean(1) + d.min(1).values.mean(1)).mean()
    out = chamfer_distance(a, b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert chamfer_distance(b, b).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: farthest_point_sample(torch.rand(1, 10, 3), 11), "only 10 points"),
        (lambda: knn(torch.rand(1, 2, 3), torch.rand(1, 5, 3), 6), "only 5 points"),
        (lambda: farthest_point_sample(torch.rand(10, 3), 2), r"shape \(B, N, 3\)"),
        (lambda: knn(torch.rand(1, 2, 2), torch.rand(1, 5, 3), 1), "3 coordinates"),
        (lambda: knn(torch.rand(2, 2, 3), torch.rand(1, 5, 3), 1), "different batch sizes"),
        (
            lambda: farthest_point_sample(torch.tensor([[[0.0, 0, 0], [float("nan"), 0, 0]]]), 1),
            "non-finite",
        ),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("CD2P_OPS_BACKEND", "torch")
    assert resolve_backend() == "torch"
    monkeypatch.setenv("CD2P_OPS_BACKEND", "auto")
    assert resolve_backend() == ("cluster" if cluster_available() else "default")
    monkeypatch.delenv("CD2P_OPS_BACKEND")
    assert resolve_backend() == "default"  # torch, with the fused FPS for CUDA tensors
    monkeypatch.setenv("CD2P_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CD2P_OPS_BACKEND"):
        resolve_backend()
    if not cluster_available():
        monkeypatch.setenv("CD2P_OPS_BACKEND", "cluster")
        with pytest.raises(RuntimeError, match="torch_cluster"):
            resolve_backend()


@pytest.mark.skipif(
    not cluster_available(),
    reason="torch-cluster is not installed (pip install --no-build-isolation 'cd2p[cluster]')",
)
def test_cluster_backend_gives_the_same_indices():
    pts = torch.rand(3, 500, 3)
    assert torch.equal(
        farthest_point_sample(pts, 40, backend="torch"),
        farthest_point_sample(pts, 40, backend="cluster"),
    )
    queries = pts[:, :40]
    assert torch.equal(
        knn(queries, pts, 8, backend="torch"), knn(queries, pts, 8, backend="cluster")
    )
