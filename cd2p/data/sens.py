"""ScanNet ``.sens`` RGB-D streams: a reader that seeks instead of reading, and a writer.

Layout (little-endian, as ScanNet's ``SensorData.h`` writes it)::

    header  version uint32 (= 4) | sensor-name length uint64 + bytes
            | colour intrinsics, colour extrinsics, depth intrinsics, depth extrinsics
              (4x4 float32 each, row-major)
            | colour compression int32 | depth compression int32
            | colour width, colour height, depth width, depth height (uint32)
            | depth shift float32 | frame count uint64
    frame   camera-to-world 4x4 float32 | colour timestamp, depth timestamp uint64
            | colour size, depth size uint64 | colour payload | depth payload
    imu     record count uint64 | records of 15 float64 + timestamp uint64 (may be absent)

Every frame header carries its payload sizes, so :class:`SensReader` indexes a file by reading
96 bytes per frame and seeking over the payloads: opening a 1.5 GB scene reads a few hundred
kB, and a frame is only read (and decoded) when asked for.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from cd2p._atomic import atomic_output

SENS_VERSION = 4

# Compression enums of ScanNet's SensorData.h.
COLOR_UNKNOWN, COLOR_RAW, COLOR_PNG, COLOR_JPEG = -1, 0, 1, 2
DEPTH_UNKNOWN, DEPTH_RAW_USHORT, DEPTH_ZLIB_USHORT, DEPTH_OCCI_USHORT = -1, 0, 1, 2
COLOR_COMPRESSION_NAMES = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION_NAMES = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
SUPPORTED_COLOR = (COLOR_RAW, COLOR_PNG, COLOR_JPEG)
SUPPORTED_DEPTH = (DEPTH_RAW_USHORT, DEPTH_ZLIB_USHORT)

_PREFIX = struct.Struct("<IQ")  # version, sensor-name length
_BODY = struct.Struct("<64f2i4IfQ")  # 4 matrices, 2 compressions, 4 sizes, depth shift, frames
_FRAME = struct.Struct("<16f4Q")  # pose, colour/depth timestamps, colour/depth payload sizes
_COUNT = struct.Struct("<Q")
_MAX_NAME_BYTES = 1 << 16  # a sensor name longer than this is a corrupt length field
_MAX_PIXELS = 1 << 28

# ScanNet's IMUFrame: five vec3d then a uint64 timestamp, 128 bytes, no padding.
IMU_DTYPE = np.dtype(
    [
        ("rotation_rate", "<f8", (3,)),
        ("acceleration", "<f8", (3,)),
        ("magnetic_field", "<f8", (3,)),
        ("attitude", "<f8", (3,)),
        ("gravity", "<f8", (3,)),
        ("timestamp", "<u8"),
    ]
)


class SensFormatError(ValueError):
    """A ``.sens`` file that does not follow the format; the message names file and offset."""


@dataclass
class SensHeader:
    """The ``.sens`` header. Matrices are ``np.float32 (4, 4)``; ``depth_shift`` converts the
    stored uint16 depth to metres (``metres = value / depth_shift``, usually 1000)."""

    version: int
    sensor_name: str
    intrinsic_color: np.ndarray
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    extrinsic_depth: np.ndarray
    color_compression: int
    depth_compression: int
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float
    num_frames: int


@dataclass
class SensFrame:
    """One RGB-D frame with its payloads exactly as stored.

    ``camera_to_world`` is ``np.float32 (4, 4)`` (camera looks along +z, x right, y down); it
    is all ``-inf`` where ScanNet's tracking failed. The trailing fields describe how to decode
    the payloads; :class:`SensReader` fills them from the header.
    """

    index: int
    camera_to_world: np.ndarray
    timestamp_color: int
    timestamp_depth: int
    color_bytes: bytes
    depth_bytes: bytes
    color_compression: int = COLOR_JPEG
    depth_compression: int = DEPTH_ZLIB_USHORT
    color_width: int = 0
    color_height: int = 0
    depth_width: int = 0
    depth_height: int = 0
    source: str = ""

    def decode_color(self) -> np.ndarray:
        """Colour image, ``np.uint8 (H, W, 3)``."""
        try:
            if self.color_compression in (COLOR_JPEG, COLOR_PNG):
                image = decode_jpeg(self.color_bytes)  # PIL reads PNG through the same call
            elif self.color_compression == COLOR_RAW:
                image = decode_raw_color(self.color_bytes, self.color_width, self.color_height)
            else:
                raise ValueError(f"unsupported colour compression {self.color_compression}")
        except ValueError as exc:
            raise SensFormatError(f"{self._where()}: colour payload: {exc}") from None
        if self.color_width and image.shape[:2] != (self.color_height, self.color_width):
            raise SensFormatError(
                f"{self._where()}: colour image is {image.shape[1]}x{image.shape[0]}, "
                f"header says {self.color_width}x{self.color_height}"
            )
        return image

    def decode_depth(self, depth_shift: float) -> np.ndarray:
        """Depth in metres, ``np.float32 (H, W)``; 0 marks pixels without a measurement."""
        if not (self.depth_width and self.depth_height):
            raise ValueError(f"{self._where()}: depth_width/depth_height unknown, cannot decode")
        try:
            if self.depth_compression == DEPTH_ZLIB_USHORT:
                return decode_depth(
                    self.depth_bytes, self.depth_width, self.depth_height, depth_shift
                )
            if self.depth_compression == DEPTH_RAW_USHORT:
                return decode_raw_depth(
                    self.depth_bytes, self.depth_width, self.depth_height, depth_shift
                )
            raise ValueError(f"unsupported depth compression {self.depth_compression}")
        except ValueError as exc:
            raise SensFormatError(f"{self._where()}: depth payload: {exc}") from None

    def _where(self) -> str:
        return f"{self.source or '<frame>'} frame {self.index}"


class FrameIndexEntry(NamedTuple):
    """Where frame ``i`` lies: byte offset of its 96-byte header, then its payload sizes."""

    offset: int
    color_size: int
    depth_size: int


# --------------------------------------------------------------------------- payload codecs
# Module-level so that callers (and tests counting decodes) see every decode.


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG (or PNG) bytes -> ``np.uint8 (H, W, 3)``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a decodable image ({len(data)} bytes): {exc}") from None


def check_jpeg(data: bytes, width: int = 0, height: int = 0) -> None:
    """Raise ``ValueError`` unless ``data`` is a whole, decodable JPEG (of ``width`` x
    ``height`` when given); returns nothing.

    The image is decoded at 1/8 scale (PIL's ``draft``, libjpeg's DCT scaling): every
    entropy-coded byte is still read, so garbage bytes, a truncated payload and much damage
    inside the stream are found, at less than half the cost of a full decode (about 1.2 ms
    instead of 2.9 ms for a 640x480 JPEG, 4.3 instead of 7.7 ms at ScanNet's 1296x968, on one
    CPU core). ``Image.verify()`` would not do: for JPEG it checks nothing. Relies on PIL's
    default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``, which cd2p never changes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                raise ValueError(f"a {image.format} image, not a JPEG")
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        # SyntaxError: what PIL's plugins raise for some malformed headers.
        raise ValueError(f"not a decodable JPEG ({len(data)} bytes): {exc}") from None
    if width and size != (width, height):
        raise ValueError(f"JPEG is {size[0]}x{size[1]}, the header says {width}x{height}")


def decode_raw_color(data: bytes, width: int, height: int) -> np.ndarray:
    """Raw RGB bytes -> ``np.uint8 (H, W, 3)``."""
    if len(data) != width * height * 3:
        raise ValueError(f"raw colour has {len(data)} bytes, expected {width * height * 3}")
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def decode_depth(data: bytes, width: int, height: int, depth_shift: float) -> np.ndarray:
    """zlib-compressed uint16 depth -> metres, ``np.float32 (height, width)``."""
    expected = 2 * width * height
    inflater = zlib.decompressobj()
    try:
        # max_length bounds the output: a corrupt stream cannot inflate into gigabytes.
        raw = inflater.decompress(data, expected)
    except zlib.error as exc:
        raise ValueError(f"not a zlib stream: {exc}") from None
    if len(raw) != expected or inflater.unconsumed_tail:
        raise ValueError(f"depth inflates to a size other than {width}x{height} uint16")
    return _depth_to_metres(raw, width, height, depth_shift)


def decode_raw_depth(data: bytes, width: int, height: int, depth_shift: float) -> np.ndarray:
    """Raw uint16 depth -> metres, ``np.float32 (height, width)``."""
    if len(data) != 2 * width * height:
        raise ValueError(f"raw depth has {len(data)} bytes, expected {2 * width * height}")
    return _depth_to_metres(data, width, height, depth_shift)


def _depth_to_metres(raw: bytes, width: int, height: int, depth_shift: float) -> np.ndarray:
    depth = np.frombuffer(raw, dtype="<u2").reshape(height, width)
    return depth.astype(np.float32) / np.float32(depth_shift)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """``np.uint8 (H, W, 3)`` -> JPEG bytes (deterministic for a given image and quality)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.getvalue()


def encode_depth(depth: np.ndarray, depth_shift: float = 1000.0, level: int = 6) -> bytes:
    """Depth in metres ``(H, W)`` -> zlib-compressed uint16 (``round(metres * shift)``)."""
    scaled = np.rint(np.nan_to_num(depth, nan=0.0, posinf=0.0) * depth_shift)
    return zlib.compress(np.clip(scaled, 0, 65535).astype("<u2").tobytes(), level)


def is_valid_pose(camera_to_world: np.ndarray) -> bool:
    """False for ScanNet's failed-tracking poses (``-inf``/``nan`` entries)."""
    return bool(np.isfinite(camera_to_world).all())


# --------------------------------------------------------------------------- reader


class SensReader:
    """Random access to the frames of a ``.sens`` file.

    Opening reads the header and every 96-byte frame header (seeking over the payloads) and
    validates them against the file size; ``frame(i)`` then reads exactly frame ``i``.

    >>> with SensReader("scene0000_00.sens") as sens:
    ...     frame = sens.frame(100)
    ...     depth = frame.decode_depth(sens.header.depth_shift)  # (H, W) metres
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Unbuffered: reads return exactly what is asked, no read-ahead into skipped payloads.
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self.header, frames_start = self._read_header()
            self.index, self._poses, self._timestamps, self._imu_offset = self._build_index(
                frames_start
            )
        except BaseException:
            self._file.close()
            raise

    # ----------------------------------------------------------------- public API
    def __len__(self) -> int:
        return self.header.num_frames

    def __enter__(self) -> SensReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def pose(self, i: int) -> np.ndarray:
        """Camera-to-world of frame ``i``, ``np.float32 (4, 4)`` (from the index, no payload)."""
        return self._poses[self._check_index(i)].copy()

    def poses(self) -> np.ndarray:
        """All camera-to-world matrices, ``np.float32 (F, 4, 4)``."""
        return self._poses.copy()

    def timestamps(self) -> np.ndarray:
        """Colour and depth timestamps of every frame, ``np.uint64 (F, 2)``."""
        return self._timestamps.copy()

    def frame(self, i: int) -> SensFrame:
        """Frame ``i`` with its payloads (reads exactly this frame's bytes)."""
        i = self._check_index(i)
        offset, color_size, depth_size = self.index[i]
        payload = self._read_exact(offset + _FRAME.size, color_size + depth_size, f"frame {i}")
        header = self.header
        return SensFrame(
            index=i,
            camera_to_world=self._poses[i].copy(),
            timestamp_color=int(self._timestamps[i, 0]),
            timestamp_depth=int(self._timestamps[i, 1]),
            color_bytes=payload[:color_size],
            depth_bytes=payload[color_size:],
            color_compression=header.color_compression,
            depth_compression=header.depth_compression,
            color_width=header.color_width,
            color_height=header.color_height,
            depth_width=header.depth_width,
            depth_height=header.depth_height,
            source=str(self.path),
        )

    def __iter__(self) -> Iterator[SensFrame]:
        for i in range(len(self)):
            yield self.frame(i)

    def imu(self) -> np.ndarray:
        """IMU records as a structured array of :data:`IMU_DTYPE`, ``(K,)``; empty if none."""
        offset = self._imu_offset
        if offset == self._size:  # files written without an IMU block
            return np.zeros(0, dtype=IMU_DTYPE)
        (count,) = _COUNT.unpack(self._read_exact(offset, _COUNT.size, "IMU record count"))
        available = self._size - offset - _COUNT.size
        if count * IMU_DTYPE.itemsize > available:
            raise SensFormatError(
                f"{self.path}: IMU block at byte offset {offset} claims {count} records "
                f"({count * IMU_DTYPE.itemsize} bytes) but only {available} bytes follow"
            )
        data = self._read_exact(offset + _COUNT.size, count * IMU_DTYPE.itemsize, "IMU records")
        return np.frombuffer(data, dtype=IMU_DTYPE).copy()

    # ----------------------------------------------------------------- parsing
    def _read_header(self) -> tuple[SensHeader, int]:
        version, name_length = _PREFIX.unpack(self._read_exact(0, _PREFIX.size, "header"))
        if version != SENS_VERSION:
            raise self._error(0, f"unsupported .sens version {version} (expected {SENS_VERSION})")
        if name_length > min(_MAX_NAME_BYTES, self._size - _PREFIX.size):
            raise self._error(4, f"sensor-name length {name_length} is corrupt")
        name = self._read_exact(_PREFIX.size, name_length, "sensor name")
        body_offset = _PREFIX.size + name_length
        values = _BODY.unpack(self._read_exact(body_offset, _BODY.size, "header"))
        matrices = np.asarray(values[:64], dtype=np.float32).reshape(4, 4, 4)
        color_compression, depth_compression = values[64:66]
        color_w, color_h, depth_w, depth_h = values[66:70]
        depth_shift, num_frames = values[70:72]
        frames_start = body_offset + _BODY.size

        fields_offset = body_offset + 256  # after the four matrices
        if color_compression not in SUPPORTED_COLOR:
            name_c = COLOR_COMPRESSION_NAMES.get(color_compression, "invalid")
            raise self._error(
                fields_offset, f"unsupported colour compression {color_compression} ({name_c})"
            )
        if depth_compression not in SUPPORTED_DEPTH:
            name_d = DEPTH_COMPRESSION_NAMES.get(depth_compression, "invalid")
            raise self._error(
                fields_offset + 4, f"unsupported depth compression {depth_compression} ({name_d})"
            )
        for what, w, h in (("colour", color_w, color_h), ("depth", depth_w, depth_h)):
            if not 0 < w * h <= _MAX_PIXELS:
                raise self._error(fields_offset + 8, f"invalid {what} size {w}x{h}")
        if not (np.isfinite(depth_shift) and depth_shift > 0):
            raise self._error(fields_offset + 24, f"invalid depth shift {depth_shift}")
        if num_frames * _FRAME.size > self._size - frames_start:
            raise self._error(
                fields_offset + 28,
                f"header claims {num_frames} frames but only {self._size - frames_start} bytes "
                f"follow the header (each frame needs at least {_FRAME.size})",
            )
        header = SensHeader(
            version=version,
            sensor_name=name.decode("utf-8", errors="replace"),
            intrinsic_color=matrices[0],
            extrinsic_color=matrices[1],
            intrinsic_depth=matrices[2],
            extrinsic_depth=matrices[3],
            color_compression=color_compression,
            depth_compression=depth_compression,
            color_width=color_w,
            color_height=color_h,
            depth_width=depth_w,
            depth_height=depth_h,
            depth_shift=float(depth_shift),
            num_frames=num_frames,
        )
        return header, frames_start

    def _build_index(
        self, offset: int
    ) -> tuple[list[FrameIndexEntry], np.ndarray, np.ndarray, int]:
        count = self.header.num_frames
        index: list[FrameIndexEntry] = []
        poses = np.empty((count, 4, 4), dtype=np.float32)
        timestamps = np.empty((count, 2), dtype=np.uint64)
        for i in range(count):
            if offset + _FRAME.size > self._size:
                raise self._error(
                    offset,
                    f"file ends inside the header of frame {i} but the header claims "
                    f"{count} frames (truncated file?)",
                )
            values = _FRAME.unpack(self._read_exact(offset, _FRAME.size, f"frame {i} header"))
            color_size, depth_size = values[18], values[19]
            end = offset + _FRAME.size + color_size + depth_size
            if end > self._size:  # checked before any payload is read or allocated
                raise self._error(
                    offset,
                    f"frame {i} claims a {color_size}-byte colour and a {depth_size}-byte depth "
                    f"payload, which run past the end of the file ({self._size} bytes; the "
                    f"header claims {count} frames)",
                )
            poses[i] = np.asarray(values[:16], dtype=np.float32).reshape(4, 4)
            timestamps[i] = values[16:18]
            index.append(FrameIndexEntry(offset, color_size, depth_size))
            offset = end
        return index, poses, timestamps, offset

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: frame {i} out of range ({n} frames)")
        return i % n

    def _read_exact(self, offset: int, size: int, what: str) -> bytes:
        if offset + size > self._size:
            raise self._error(
                offset, f"truncated {what}: needs {size} bytes, {self._size - offset} left"
            )
        self._file.seek(offset)
        chunks, remaining = [], size
        while remaining:  # raw reads may return short
            chunk = self._file.read(remaining)
            if not chunk:
                raise self._error(offset, f"truncated {what}: file shrank while reading")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _error(self, offset: int, message: str) -> SensFormatError:
        return SensFormatError(f"{self.path}: byte offset {offset}: {message}")


# --------------------------------------------------------------------------- writer


def write_sens(
    path: str | Path,
    header: SensHeader,
    frames: Iterable[SensFrame],
    imu: np.ndarray | None = None,
) -> int:
    """Write a ``.sens`` file in ScanNet's layout (atomically: temporary name, then rename).

    ``frames`` may be any iterable (a generator streams frames to disk without holding them);
    the frame count written is the number of frames actually given (``header.num_frames`` is
    ignored). ``imu`` is a structured array of :data:`IMU_DTYPE` or ``None`` (an empty IMU
    block is written, as ScanNet's tools expect one). Returns the number of frames written.
    """
    if header.version != SENS_VERSION:
        raise ValueError(f"can only write .sens version {SENS_VERSION}, got {header.version}")
    path = Path(path)
    imu_records = np.zeros(0, IMU_DTYPE) if imu is None else np.asarray(imu, dtype=IMU_DTYPE)
    name = header.sensor_name.encode("utf-8")
    matrices = [
        header.intrinsic_color,
        header.extrinsic_color,
        header.intrinsic_depth,
        header.extrinsic_depth,
    ]
    body_fixed = np.concatenate([np.asarray(m, np.float32).reshape(16) for m in matrices])
    with atomic_output(path) as tmp, open(tmp, "wb") as out:
        out.write(_PREFIX.pack(SENS_VERSION, len(name)) + name)
        count_offset = out.tell() + _BODY.size - _COUNT.size
        out.write(
            _BODY.pack(
                *body_fixed.tolist(),
                header.color_compression,
                header.depth_compression,
                header.color_width,
                header.color_height,
                header.depth_width,
                header.depth_height,
                header.depth_shift,
                0,  # frame count, patched below once the frames are streamed
            )
        )
        count = 0
        for frame in frames:
            pose = np.asarray(frame.camera_to_world, dtype=np.float32).reshape(16)
            out.write(
                _FRAME.pack(
                    *pose.tolist(),
                    frame.timestamp_color,
                    frame.timestamp_depth,
                    len(frame.color_bytes),
                    len(frame.depth_bytes),
                )
            )
            out.write(frame.color_bytes)
            out.write(frame.depth_bytes)
            count += 1
        out.write(_COUNT.pack(len(imu_records)) + imu_records.tobytes())
        out.seek(count_offset)
        out.write(_COUNT.pack(count))
    return count
