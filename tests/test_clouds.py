"""A user's own clouds: every format cd2p reads round-trips a cloud written by the test."""

from __future__ import annotations

import numpy as np
import pytest

from cd2p.data.clouds import Cloud, lzf_decompress, lzf_literals, read_cloud, write_cloud


def _cloud(n: int = 50, seed: int = 0) -> Cloud:
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(n, 3))
    return Cloud(
        points=rng.normal(size=(n, 3)).astype(np.float32),
        colors=rng.integers(0, 256, size=(n, 3)).astype(np.uint8),
        labels=rng.integers(0, 40, size=n).astype(np.int64),
        faces=np.array([[0, 1, 2], [2, 3, 4]], dtype=np.int64),
        normals=(normals / np.linalg.norm(normals, axis=1, keepdims=True)).astype(np.float32),
    )


# (file name, writer options, what the format carries besides x y z)
FORMATS = [
    ("c.ply", {"binary": True}, {"colors", "normals", "labels", "faces"}),
    ("c-ascii.ply", {"binary": False}, {"colors", "normals", "labels", "faces"}),
    ("c.pcd", {"data": "binary"}, {"colors", "normals", "labels"}),
    ("c-ascii.pcd", {"data": "ascii"}, {"colors", "normals", "labels"}),
    ("c-lzf.pcd", {"data": "binary_compressed"}, {"colors", "normals", "labels"}),
    ("c.npz", {}, {"colors", "normals", "labels"}),
    ("c.npy", {}, {"colors"}),
    ("c.txt", {}, {"colors", "normals"}),
    ("c.xyz", {}, {"colors", "normals"}),
    ("c.csv", {}, {"colors", "normals"}),
]


@pytest.mark.parametrize(("name", "options", "carried"), FORMATS)
def test_every_format_round_trips_a_cloud(tmp_path, name, options, carried):
    cloud = _cloud()
    path = write_cloud(tmp_path / name, cloud, **options)
    back = read_cloud(path)
    np.testing.assert_allclose(back.points, cloud.points, rtol=1e-6, atol=1e-6)
    for field in ("colors", "normals", "labels", "faces"):
        got, want = getattr(back, field), getattr(cloud, field)
        if field in carried:
            assert got is not None, field
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=field)
        else:
            assert got is None, field
    assert back.source == str(path) and back.dropped == 0


def test_tables_tell_normals_from_colours(tmp_path):
    cloud = _cloud()
    only_normals = Cloud(cloud.points, normals=cloud.normals)
    back = read_cloud(write_cloud(tmp_path / "n.txt", only_normals))  # ModelNet40's x,y,z,nx,ny,nz
    assert back.colors is None and np.allclose(back.normals, cloud.normals, atol=1e-6)
    unit_colours = np.column_stack([cloud.points, cloud.colors / 255.0])  # 0..1 colours
    np.savetxt(tmp_path / "rgb01.txt", unit_colours)
    assert np.array_equal(read_cloud(tmp_path / "rgb01.txt").colors, cloud.colors)
    (tmp_path / "head.csv").write_text("x,y,z\n1,2,3\n4,5,6\n")  # a header row is skipped
    assert read_cloud(tmp_path / "head.csv").points.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_big_endian_ply_polygons_and_float_colours(tmp_path):
    vertex = np.array([(0.0, 0.0, 0.0, 1.0, 0.5, 0.0), (1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
                       (1.0, 1.0, 0.0, 0.2, 0.2, 0.2), (0.0, 1.0, 0.0, 1.0, 1.0, 1.0)],
                      dtype=[(c, ">f4") for c in ("x", "y", "z", "red", "green", "blue")])
    header = ("ply\nformat binary_big_endian 1.0\nelement vertex 4\n"
              + "".join(f"property float {c}\n" for c in ("x", "y", "z", "red", "green", "blue"))
              + "element face 1\nproperty list uchar int vertex_indices\nend_header\n")  # fmt: skip
    quad = np.array([4], ">u1").tobytes() + np.array([0, 1, 2, 3], ">i4").tobytes()
    (tmp_path / "be.ply").write_bytes(header.encode() + vertex.tobytes() + quad)
    cloud = read_cloud(tmp_path / "be.ply")
    assert cloud.points[2].tolist() == [1, 1, 0]
    assert cloud.colors[0].tolist() == [255, 128, 0]  # float colours in 0..1 -> 0..255
    assert cloud.faces.tolist() == [[0, 1, 2], [0, 2, 3]]  # the quad as a fan of triangles


def test_pcd_nan_points_are_dropped_and_lzf_back_references_decode(tmp_path):
    cloud = _cloud(10)
    cloud.points[3] = np.nan  # an organised cloud's missing pixel
    back = read_cloud(write_cloud(tmp_path / "nan.pcd", Cloud(cloud.points, cloud.colors)))
    assert len(back) == 9 and back.dropped == 1
    assert np.array_equal(back.colors, np.delete(cloud.colors, 3, axis=0))
    # "abc" as literals, then a 4-byte copy starting 3 back (it overlaps itself): "abcabca"
    stream = bytes([2]) + b"abc" + bytes([(2 << 5) | 0, 2])
    assert lzf_decompress(stream, 7) == b"abcabca"
    long_copy = bytes([0]) + b"z" + bytes([(7 << 5) | 0, 3, 0])  # length 7 + 3 + 2 = 12
    assert lzf_decompress(long_copy, 13) == b"z" * 13
    assert lzf_decompress(lzf_literals(bytes(range(100))), 100) == bytes(range(100))
    with pytest.raises(ValueError, match="corrupt LZF"):
        lzf_decompress(bytes([(1 << 5), 9]), 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.ply",
         b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nend_header\n1\n2\n",
         "no vertex element with x, y and z"),
        ("short.pcd", b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 5\nDATA binary\n\0\0",
         "truncated"),
        ("text.txt", b"1 2 3\nfour five six\n", "not a table of numbers"),
        ("two.txt", b"1 2\n3 4\n", r"expected an \(N, 3\+\) array"),
        ("inf.xyz", b"1 2 3\ninf 0 0\n", "non-finite"),
        ("c.obj", b"v 1 2 3\n", "unknown point-cloud format"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_cloud(tmp_path / name)
    assert str(error.value).startswith(str(tmp_path / name)) and "\n" not in str(error.value)
