"""The .sens reader and writer, on files written into tmp_path."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from cd2p.data import sens
from cd2p.data.sens import (
    IMU_DTYPE,
    SensFormatError,
    SensFrame,
    SensHeader,
    SensReader,
    encode_depth,
    encode_jpeg,
    write_sens,
)

COLOR_W, COLOR_H, DEPTH_W, DEPTH_H = 32, 24, 16, 12
NAME = "StructureSensor"
FRAME_HEADER_BYTES = 96


def make_header(**overrides) -> SensHeader:
    k_color = np.array([[28, 0, 15.5, 0], [0, 28, 11.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    fields = dict(
        version=4, sensor_name=NAME,
        intrinsic_color=k_color, extrinsic_color=np.eye(4, dtype=np.float32),
        intrinsic_depth=k_color * np.float32(0.5), extrinsic_depth=np.eye(4, dtype=np.float32),
        color_compression=sens.COLOR_JPEG, depth_compression=sens.DEPTH_ZLIB_USHORT,
        color_width=COLOR_W, color_height=COLOR_H, depth_width=DEPTH_W, depth_height=DEPTH_H,
        depth_shift=1000.0, num_frames=0,
    )  # fmt: skip
    fields.update(overrides)
    return SensHeader(**fields)


def make_frames(count: int, seed: int = 0) -> list[tuple[SensFrame, np.ndarray, np.ndarray]]:
    """Frames with smooth colour images (JPEG-friendly) and mm-exact depth."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        v, u = np.mgrid[0:COLOR_H, 0:COLOR_W]
        start, slope = rng.uniform(40, 120, 3), rng.uniform(-2, 2, 3)
        color = np.clip(start + slope * (u + v)[..., None], 0, 255).astype(np.uint8)  # smooth
        depth = np.round(rng.uniform(0.5, 4.0, (DEPTH_H, DEPTH_W)), 3).astype(np.float32)
        depth[0, :3] = 0.0  # invalid pixels
        pose = np.eye(4, dtype=np.float32)
        pose[:3, 3] = rng.normal(size=3)
        if i == 1:
            pose[:] = -np.inf  # ScanNet's failed tracking
        frame = SensFrame(
            index=i, camera_to_world=pose, timestamp_color=1000 * i, timestamp_depth=1000 * i + 7,
            color_bytes=encode_jpeg(color, quality=95), depth_bytes=encode_depth(depth, 1000.0),
        )  # fmt: skip
        out.append((frame, color, depth))
    return out


def make_imu(count: int) -> np.ndarray:
    imu = np.zeros(count, dtype=IMU_DTYPE)
    rng = np.random.default_rng(3)
    for name in ("rotation_rate", "acceleration", "magnetic_field", "attitude", "gravity"):
        imu[name] = rng.normal(size=(count, 3))
    imu["timestamp"] = np.arange(count) * 500
    return imu


@pytest.fixture
def sens_file(tmp_path):
    frames = make_frames(5)
    path = tmp_path / "scene.sens"
    written = write_sens(path, make_header(), (f for f, _, _ in frames), imu=make_imu(4))
    assert written == 5
    return path, frames


def patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def frame_offset(i: int, frames) -> int:
    """Byte offset of frame i's header, computed from the layout, not from the reader."""
    offset = 12 + len(NAME) + 292
    for frame, _, _ in frames[:i]:
        offset += FRAME_HEADER_BYTES + len(frame.color_bytes) + len(frame.depth_bytes)
    return offset


# --------------------------------------------------------------------------- round trips


def test_header_and_frames_round_trip(sens_file):
    path, frames = sens_file
    expected = make_header()
    with SensReader(path) as reader:
        header = reader.header
        assert len(reader) == header.num_frames == 5
        assert (header.version, header.sensor_name) == (4, NAME)
        for name in ("intrinsic_color", "extrinsic_color", "intrinsic_depth", "extrinsic_depth"):
            np.testing.assert_array_equal(getattr(header, name), getattr(expected, name))
            assert getattr(header, name).dtype == np.float32
        assert (header.color_width, header.color_height) == (COLOR_W, COLOR_H)
        assert (header.depth_width, header.depth_height) == (DEPTH_W, DEPTH_H)
        assert header.depth_shift == 1000.0
        for (written, color, depth), read in zip(frames, reader, strict=True):
            assert read.color_bytes == written.color_bytes  # stored as-is, no re-encoding
            assert read.depth_bytes == written.depth_bytes
            np.testing.assert_array_equal(read.camera_to_world, written.camera_to_world)
            assert (read.timestamp_color, read.timestamp_depth) == (
                written.timestamp_color, written.timestamp_depth)  # fmt: skip
            decoded = read.decode_color()
            assert decoded.shape == (COLOR_H, COLOR_W, 3) and decoded.dtype == np.uint8
            assert np.abs(decoded.astype(int) - color).mean() < 3  # JPEG is lossy
            metres = read.decode_depth(header.depth_shift)
            assert metres.dtype == np.float32 and metres.shape == (DEPTH_H, DEPTH_W)
            np.testing.assert_allclose(metres, depth, atol=1e-6)
            assert (metres[0, :3] == 0).all()


def test_layout_matches_scannet_sequential_parse(sens_file):
    """Parse the file the way ScanNet's own reader does (one field after the other)."""
    path, frames = sens_file
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    (version,) = take("I")
    (name_len,) = take("Q")
    name = data[pos : pos + name_len].decode()
    pos += name_len
    matrices = np.array(take("64f"), np.float32).reshape(4, 4, 4)
    color_c, depth_c = take("2i")
    sizes = take("4I")
    (shift,) = take("f")
    (count,) = take("Q")
    assert (version, name, color_c, depth_c, sizes, shift, count) == (
        4, NAME, 2, 1, (COLOR_W, COLOR_H, DEPTH_W, DEPTH_H), 1000.0, 5)  # fmt: skip
    np.testing.assert_array_equal(matrices[0], make_header().intrinsic_color)
    for written, _, _ in frames:
        pose = np.array(take("16f"), np.float32).reshape(4, 4)
        _, _, color_size, depth_size = take("4Q")
        np.testing.assert_array_equal(pose, written.camera_to_world)
        assert data[pos : pos + color_size] == written.color_bytes
        pos += color_size
        depth = np.frombuffer(zlib.decompress(data[pos : pos + depth_size]), "<u2")
        assert depth.size == DEPTH_W * DEPTH_H
        pos += depth_size
    (imu_count,) = take("Q")
    assert imu_count == 4 and pos + 4 * 128 == len(data)


def test_random_access_returns_the_frame_written(sens_file):
    path, frames = sens_file
    with SensReader(path) as reader:
        for i in (3, 0, 4, 2, -1):
            frame = reader.frame(i)
            written = frames[i][0]
            assert frame.index == i % 5
            assert frame.color_bytes == written.color_bytes
            assert frame.depth_bytes == written.depth_bytes
        assert [entry.offset for entry in reader.index] == [
            frame_offset(i, frames) for i in range(5)
        ]
        with pytest.raises(IndexError):
            reader.frame(5)


def test_poses_come_from_frame_headers_only(sens_file, monkeypatch):
    path, frames = sens_file
    reads: list[tuple[int, int]] = []
    original = SensReader._read_exact

    def recording(self, offset, size, what):
        reads.append((offset, size))
        return original(self, offset, size, what)

    monkeypatch.setattr(SensReader, "_read_exact", recording)
    with SensReader(path) as reader:
        poses = reader.poses()
        single = reader.pose(3)
    for i, (written, _, _) in enumerate(frames):
        np.testing.assert_array_equal(poses[i], written.camera_to_world)
    np.testing.assert_array_equal(single, frames[3][0].camera_to_world)
    assert not np.isfinite(poses[1]).any() and not sens.is_valid_pose(poses[1])
    # Only the header and the 96-byte frame headers were read, never a payload.
    frame_reads = [r for r in reads if r[1] == FRAME_HEADER_BYTES]
    assert sorted(o for o, _ in frame_reads) == [frame_offset(i, frames) for i in range(5)]
    assert sum(size for _, size in reads) == 12 + len(NAME) + 292 + 5 * FRAME_HEADER_BYTES


def test_indexing_and_poses_decode_nothing(sens_file, monkeypatch):
    path, _ = sens_file
    calls = {"jpeg": 0, "depth": 0}

    def counting(name, func):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return func(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(sens, "decode_jpeg", counting("jpeg", sens.decode_jpeg))
    monkeypatch.setattr(sens, "decode_depth", counting("depth", sens.decode_depth))
    with SensReader(path) as reader:
        reader.poses()
        frame = reader.frame(2)  # payload bytes, still not decoded
        assert calls == {"jpeg": 0, "depth": 0}
        frame.decode_color()
        frame.decode_depth(reader.header.depth_shift)
    assert calls == {"jpeg": 1, "depth": 1}


def test_imu_round_trip(tmp_path, sens_file):
    path, _ = sens_file
    with SensReader(path) as reader:
        imu = reader.imu()
    expected = make_imu(4)
    assert imu.dtype == IMU_DTYPE and len(imu) == 4
    for name in IMU_DTYPE.names:
        np.testing.assert_array_equal(imu[name], expected[name])
    # No IMU given: an empty block, read back as an empty array.
    empty_path = tmp_path / "no_imu.sens"
    write_sens(empty_path, make_header(), [f for f, _, _ in make_frames(2)])
    with SensReader(empty_path) as reader:
        assert len(reader.imu()) == 0


def test_failed_write_leaves_no_file(tmp_path):
    def broken_frames():
        yield make_frames(1)[0][0]
        raise RuntimeError("renderer crashed")

    path = tmp_path / "partial.sens"
    with pytest.raises(RuntimeError):
        write_sens(path, make_header(), broken_frames())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- validation


def test_wrong_version(sens_file):
    path, _ = sens_file
    patch(path, 0, struct.pack("<I", 5))
    with pytest.raises(
        SensFormatError, match=r"scene\.sens: byte offset 0: unsupported .sens vers"
    ):
        SensReader(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "tiny.sens"
    path.write_bytes(struct.pack("<IQ", 4, len(NAME)) + NAME.encode() + b"\0" * 40)
    with pytest.raises(SensFormatError, match=r"tiny\.sens: byte offset \d+: truncated header"):
        SensReader(path)


def test_truncated_file(sens_file):
    path, frames = sens_file
    cut = frame_offset(3, frames) + FRAME_HEADER_BYTES + 10  # inside frame 3's colour payload
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(SensFormatError) as info:
        SensReader(path)
    message = str(info.value)
    assert str(path) in message and f"byte offset {frame_offset(3, frames)}" in message
    assert "frame 3" in message and "past the end" in message


def test_frame_count_beyond_file(sens_file):
    path, frames = sens_file
    count_offset = 12 + len(NAME) + 292 - 8
    patch(path, count_offset, struct.pack("<Q", 7))
    with pytest.raises(SensFormatError, match=r"frame 5 .*header claims 7 frames"):
        SensReader(path)


@pytest.mark.parametrize("bad_size", [2**60, 2**64 - 1, 10_000_000])
def test_corrupt_size_is_rejected_before_reading(sens_file, monkeypatch, bad_size):
    path, frames = sens_file
    size_offset = frame_offset(1, frames) + 64 + 16  # frame 1's colour payload size
    patch(path, size_offset, struct.pack("<Q", bad_size))
    requested: list[int] = []
    original = SensReader._read_exact

    def recording(self, offset, size, what):
        requested.append(size)
        return original(self, offset, size, what)

    monkeypatch.setattr(SensReader, "_read_exact", recording)
    with pytest.raises(SensFormatError) as info:
        SensReader(path)
    assert f"byte offset {frame_offset(1, frames)}" in str(info.value)
    assert f"{bad_size}-byte colour" in str(info.value)
    assert max(requested) <= FRAME_HEADER_BYTES + 292  # nothing sized by the corrupt field


def test_corrupt_imu_count(sens_file):
    path, _ = sens_file
    size = path.stat().st_size
    patch(path, size - 4 * 128 - 8, struct.pack("<Q", 2**50))
    with SensReader(path) as reader:  # frames stay readable
        assert reader.frame(4).index == 4
        with pytest.raises(SensFormatError, match="IMU block .* claims"):
            reader.imu()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("depth_compression", sens.DEPTH_OCCI_USHORT, "unsupported depth compression 2 .occi"),
        ("color_compression", sens.COLOR_UNKNOWN, "unsupported colour compression -1 .unknown"),
        ("color_compression", 7, "unsupported colour compression 7"),
    ],
)
def test_unsupported_compression(tmp_path, field, value, expected):
    path = tmp_path / "odd.sens"
    write_sens(path, make_header(**{field: value}), [f for f, _, _ in make_frames(1)])
    with pytest.raises(SensFormatError, match=rf"odd\.sens: byte offset \d+: {expected}"):
        SensReader(path)


def test_corrupt_payload_names_file_and_frame(sens_file):
    path, frames = sens_file
    payload_offset = frame_offset(2, frames) + FRAME_HEADER_BYTES
    patch(path, payload_offset, b"\0" * 16)  # destroy the JPEG magic
    with SensReader(path) as reader:
        with pytest.raises(SensFormatError, match=r"scene\.sens frame 2: colour payload"):
            reader.frame(2).decode_color()
        reader.frame(3).decode_color()  # other frames unaffected


def test_raw_payloads(tmp_path):
    """Uncompressed colour and depth (ScanNet's raw types) decode too."""
    color = np.arange(COLOR_W * COLOR_H * 3, dtype=np.uint8).reshape(COLOR_H, COLOR_W, 3)
    depth_mm = np.arange(DEPTH_W * DEPTH_H, dtype="<u2").reshape(DEPTH_H, DEPTH_W)
    frame = SensFrame(0, np.eye(4, dtype=np.float32), 0, 0, color.tobytes(), depth_mm.tobytes())
    header = make_header(color_compression=sens.COLOR_RAW, depth_compression=sens.DEPTH_RAW_USHORT)
    path = tmp_path / "raw.sens"
    write_sens(path, header, [frame])
    with SensReader(path) as reader:
        read = reader.frame(0)
        np.testing.assert_array_equal(read.decode_color(), color)
        np.testing.assert_allclose(read.decode_depth(1000.0), depth_mm / 1000.0, rtol=1e-6)
