"""Safe loading and preprocessing of untrusted images and videos.

Everything here is a pure function of (file, MediaConfig): no Ray, no torch, so the describe
stage can call it inside any executor and tests can call it directly. Every failure that a bad
input can cause is raised as a `MediaError` whose `.kind` is a short category; the stage turns
it into an error row and the run goes on (design.md: "failures are data").

Output contract (what the MLLM engines receive):
  image -> uint8 (H, W, 3) RGB, H * W <= max_pixels, min(H, W) >= min_side
  video -> uint8 (T, H, W, 3) RGB, T even and >= 2 (Qwen2-VL's temporal patch is 2 frames)
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import math
import os
import posixpath
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from pipelines import storage

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi"}

# Decoders PIL may use, whatever the file is named. A misnamed PNG/JPEG is common in scraped
# data and fine; anything else (EPS runs Ghostscript, PSD/... add decoder attack surface) is
# refused because no dataset we read is meant to contain it. TIFF and BMP are formats people
# have (scans, microscopy, old archives): same checks; a multi-page TIFF gives its first page.
_ALLOWED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO files
_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS_SWAPPING_AXES = {5, 6, 7, 8}  # the transposes and the 90/270 degree rotations


def media_type_for(name: str) -> str | None:
    """Returns "image", "video" or None, from the lowercase extension of `name`."""
    extension = os.path.splitext(name)[1].lower()
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in VIDEO_EXTENSIONS:
        return "video"
    return None


@dataclass(frozen=True)
class MediaConfig:
    max_pixels: int = 448 * 448  # bound on each output image / frame (area), aspect kept
    min_side: int = 28  # tiny images are upscaled so the shorter side is >= this (Qwen2-VL needs 28)
    max_source_pixels: int = 89_478_485  # source area above this => "decompression_bomb"
    max_aspect_ratio: float = 200.0  # more extreme => "bad_aspect_ratio" (Qwen2-VL rejects > 200)
    video_frames: int = 8  # N uniform frames (used when video_fps is None)
    video_fps: float | None = None  # else sample at this rate ...
    max_video_frames: int = 32  # ... capped at this many frames
    max_file_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.max_pixels < self.min_side**2:
            raise ValueError(f"need 1 <= min_side and min_side**2 <= max_pixels, got {self}")
        if self.video_frames < 1 or self.max_video_frames < 1:
            raise ValueError(f"video_frames and max_video_frames must be >= 1, got {self}")
        if self.video_fps is not None and not self.video_fps > 0:
            raise ValueError(f"video_fps must be > 0 or None, got {self.video_fps}")


class MediaError(Exception):
    """A bad input. `.kind` is a snake_case category, str(error) a readable reason.

    kinds: empty_file, too_large, unreadable_image, decompression_bomb, bad_aspect_ratio,
    unreadable_video, no_video_stream, empty_video, outside_root, not_found, unsupported_type
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling; the default reduce would call
        # MediaError(message) and lose `kind`.
        return (MediaError, (self.kind, str(self)))


@dataclass
class LoadedMedia:
    media_type: str  # "image" | "video"
    pixels: np.ndarray  # uint8, (H, W, 3) for an image; (T, H, W, 3) for a video
    source_width: int
    source_height: int
    frame_indices: list[int] | None = None  # video only: source frame of each output frame
    source_fps: float | None = None
    source_frames: int | None = None


# ----------------------------------------------------------------------------- paths


def resolve_inside_root(root: Path, relpath: str) -> Path:
    """The real path of `relpath` under `root`; refuses anything that leaves root.

    Annotation files are untrusted: `../`, absolute paths and symlinks are all resolved first
    (os.path.realpath), then the result must still lie inside root's own real path. Only
    then is existence checked, so a caller cannot probe which files exist outside root.
    """
    if "\x00" in relpath:
        raise MediaError("outside_root", f"path contains a NUL byte: {relpath!r}")
    real_root = os.path.realpath(root)
    real_path = os.path.realpath(os.path.join(real_root, relpath))
    if os.path.commonpath([real_root, real_path]) != real_root:
        raise MediaError("outside_root", f"{relpath!r} resolves outside the input root {str(root)!r}")
    if not os.path.exists(real_path):
        raise MediaError("not_found", f"{relpath!r} does not exist under {str(root)!r}")
    # Regular files only: opening a FIFO or a device found in the tree would block or never end.
    if not os.path.isfile(real_path):
        raise MediaError("not_found", f"{relpath!r} is not a regular file")
    return Path(real_path)


def _check_file_size(path: Path, cfg: MediaConfig) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MediaError("not_found", f"{path} does not exist") from None
    if size == 0:
        raise MediaError("empty_file", f"{path} is empty (0 bytes)")
    if size > cfg.max_file_bytes:
        raise MediaError("too_large", f"{path} is {size} bytes, above max_file_bytes={cfg.max_file_bytes}")


# ----------------------------------------------------------------------------- geometry


def _check_source_geometry(width: int, height: int, cfg: MediaConfig) -> None:
    """Refuses a bomb or an extreme aspect ratio (images: from the header, before decoding;
    videos: from the first decoded frame, as decord reports no size before decoding)."""
    if width < 1 or height < 1:
        raise MediaError("unreadable_image", f"invalid size {width}x{height}")
    # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that; treating its warning
    # as an error too means the bound is the smaller of ours and PIL's. Done by comparing sizes
    # rather than with warnings.catch_warnings, which mutates process-global state and is not
    # thread-safe.
    limit = cfg.max_source_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise MediaError(
            "decompression_bomb", f"source is {width}x{height} = {width * height} pixels, above the limit {limit}"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > cfg.max_aspect_ratio:
        raise MediaError(
            "bad_aspect_ratio", f"source is {width}x{height}, aspect ratio {aspect:.1f} > {cfg.max_aspect_ratio}"
        )


def target_size(width: int, height: int, cfg: MediaConfig) -> tuple[int, int]:
    """(width, height) after keeping aspect, fitting area max_pixels, shorter side >= min_side.

    min_side wins over max_pixels for extreme aspect ratios; with the defaults both hold
    (aspect 200 at short side 28 is 28 x 5600 = 156,800 <= 448 * 448).
    """
    scale = min(1.0, math.sqrt(cfg.max_pixels / (width * height)))
    new_width = max(1, math.floor(width * scale))
    new_height = max(1, math.floor(height * scale))
    if min(new_width, new_height) < cfg.min_side:
        upscale = cfg.min_side / min(width, height)
        new_width = max(cfg.min_side, round(width * upscale))
        new_height = max(cfg.min_side, round(height * upscale))
    return new_width, new_height


def _resize_rgb(image: Image.Image, cfg: MediaConfig) -> Image.Image:
    size = target_size(image.width, image.height, cfg)
    if size == image.size:
        return image
    # reducing_gap shrinks big sources by box-averaging first, then BICUBIC: the quality of
    # BICUBIC at a fraction of the cost for panoramas and camera-sized photos.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


# ----------------------------------------------------------------------------- images


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """I;16* / I images: rescale 0..65535 to 0..255 (PIL's convert("L") clips at 255 instead)."""
    values = np.asarray(image).astype(np.int64)
    # Mode "I" (32-bit) here comes from 16-bit sources; anything outside 16 bits is clipped.
    values = np.clip(values, 0, 65535)
    eight_bit = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    # Transparent pixels keep arbitrary colour values (often black); on white they read as
    # background, which is how viewers show them and what captions describe.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(image)
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info
    if has_alpha:
        return _composite_on_white(image)
    if mode == "RGB":
        return image
    # CMYK (incl. Adobe's inverted CMYK, which PIL's JPEG plugin undoes), L, 1, P, YCbCr, F.
    return image.convert("RGB")


def _decode_image(path: Path, cfg: MediaConfig) -> tuple[np.ndarray, int, int]:
    """Returns (pixels, source_width, source_height); raises whatever PIL raises."""
    with Image.open(path, formats=_ALLOWED_IMAGE_FORMATS) as image:
        # Image.open reads only the header: size is known, no pixel is decoded yet.
        source_width, source_height = image.size
        _check_source_geometry(source_width, source_height, cfg)
        if image.format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the output is that much
            # smaller (never below the requested size): big photos cost a fraction.
            image.draft(image.mode, target_size(source_width, source_height, cfg))
        image.load()  # here truncated / corrupt data fails; GIF, WebP and TIFF stay on frame 0 (page 1)
        if image.getexif().get(_EXIF_ORIENTATION) in _ORIENTATIONS_SWAPPING_AXES:
            # Report the source size as a viewer shows it, like the pixels.
            source_width, source_height = source_height, source_width
        rgb = _resize_rgb(_to_rgb(ImageOps.exif_transpose(image)), cfg)
        pixels = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(pixels), source_width, source_height


def load_image(path: Path, cfg: MediaConfig) -> LoadedMedia:
    path = Path(path)
    _check_file_size(path, cfg)
    try:
        pixels, source_width, source_height = _decode_image(path, cfg)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise MediaError("decompression_bomb", f"{path.name}: {error}") from None
    except Exception as error:  # noqa: BLE001 - untrusted bytes: any decoder failure is a bad file
        # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError,
        # EOFError, struct.error, ... depending on the plugin and where the data breaks.
        raise MediaError("unreadable_image", f"{path.name}: {type(error).__name__}: {error}") from None
    return LoadedMedia("image", pixels, source_width, source_height)


# ----------------------------------------------------------------------------- video containers
#
# Why the container is checked in Python before decord sees it:
#  * decord hands the file to FFmpeg's format probing, which accepts any of FFmpeg's demuxers,
#    including playlist formats (HLS, concat) that open further local files or URLs. A file
#    named .mp4 that holds a playlist must never get that far, so only the container families
#    of VIDEO_EXTENSIONS are let through, recognised by their magic bytes.
#  * decord's messages do not tell "no video track" or "no frames" apart from corruption (an
#    MP4 with a video track but no samples fails in decord with "Cannot create buffer source").
#    Walking the MP4 box tree (headers only, bounded reads) classifies those exactly.
# These checks cannot make decord itself safe: see "Why decord runs in a helper process" below.

_MAX_TOP_LEVEL_BOXES = 100_000
_MAX_MOOV_BYTES = 64 * 1024**2  # hours of video index; larger is left to decord


def _container_family(header: bytes) -> str | None:
    if header[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"):
        return "mp4"
    if header[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # mkv and webm
    if header[:4] == b"RIFF" and header[8:12] == b"AVI ":
        return "avi"
    return None


def _iter_boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload_start, payload_end) of each ISO-BMFF box in data[start:end]."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, box_type = struct.unpack(">I4s", data[offset : offset + 8])
        header = 8
        if size == 1:
            if offset + 16 > end:
                return
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
            header = 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            return  # malformed or cut short: stop, decord gets the final word
        yield box_type, offset + header, offset + size
        offset += size


def _read_top_level_boxes(path: Path) -> tuple[list[bytes], bytes | None]:
    """Top-level box types of an MP4 and the moov payload (None if absent or too large)."""
    types: list[bytes] = []
    moov = None
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + 8 <= file_size and len(types) < _MAX_TOP_LEVEL_BOXES:
            handle.seek(offset)
            header = handle.read(16)
            size, box_type = struct.unpack(">I4s", header[:8])
            header_size = 8
            if size == 1 and len(header) == 16:
                size, header_size = struct.unpack(">Q", header[8:16])[0], 16
            elif size == 0:
                size = file_size - offset
            if size < header_size:
                break
            types.append(box_type)
            if box_type == b"moov" and size <= _MAX_MOOV_BYTES and offset + size <= file_size:
                handle.seek(offset + header_size)
                moov = handle.read(size - header_size)
            offset += size
    return types, moov


def _find_child(data: bytes, start: int, end: int, wanted: bytes) -> tuple[int, int] | None:
    for box_type, payload_start, payload_end in _iter_boxes(data, start, end):
        if box_type == wanted:
            return payload_start, payload_end
    return None


def _mp4_video_sample_counts(moov: bytes) -> list[int]:
    """Sample count of every video ('vide' handler) track in a moov payload."""
    counts = []
    for box_type, trak_start, trak_end in _iter_boxes(moov):
        if box_type != b"trak":
            continue
        mdia = _find_child(moov, trak_start, trak_end, b"mdia")
        hdlr = mdia and _find_child(moov, *mdia, b"hdlr")
        # hdlr payload: version/flags (4), pre_defined (4), handler_type (4)
        if not hdlr or moov[hdlr[0] + 8 : hdlr[0] + 12] != b"vide":
            continue
        minf = _find_child(moov, *mdia, b"minf")
        stbl = minf and _find_child(moov, *minf, b"stbl")
        sizes = stbl and (_find_child(moov, *stbl, b"stsz") or _find_child(moov, *stbl, b"stz2"))
        # stsz/stz2 payload: version/flags (4), sample_size or field size (4), sample_count (4)
        count = struct.unpack(">I", moov[sizes[0] + 8 : sizes[0] + 12])[0] if sizes else 0
        counts.append(count)
    return counts


def _check_mp4_structure(path: Path) -> None:
    types, moov = _read_top_level_boxes(path)
    if b"moov" not in types:
        raise MediaError("unreadable_video", f"{path.name}: MP4 without a 'moov' box (truncated or corrupt)")
    if moov is None:
        return  # moov too large to inspect cheaply or cut short: let decord judge it
    counts = _mp4_video_sample_counts(moov)
    if not counts:
        raise MediaError("no_video_stream", f"{path.name}: the MP4 has no video track")
    fragmented = b"moof" in types  # fragmented MP4 keeps its samples in moof boxes, not stsz
    if max(counts) == 0 and not fragmented:
        raise MediaError("empty_video", f"{path.name}: the video track has no frames")


def _check_container(path: Path) -> None:
    with open(path, "rb") as handle:
        header = handle.read(12)
    family = _container_family(header)
    if family is None:
        raise MediaError("unreadable_video", f"{path.name}: not an MP4, Matroska/WebM or AVI file")
    if family == "mp4":
        _check_mp4_structure(path)


# ----------------------------------------------------------------------------- videos


def _uniform_indices(num_source_frames: int, count: int) -> list[int]:
    """Centres of `count` equal segments of [0, num_source_frames)."""
    count = max(1, min(count, num_source_frames))
    return [min(num_source_frames - 1, int((i + 0.5) * num_source_frames / count)) for i in range(count)]


def sample_frame_indices(num_source_frames: int, source_fps: float | None, cfg: MediaConfig) -> list[int]:
    """Which source frames to keep; always an even count >= 2 (the last is repeated if needed)."""
    if cfg.video_fps is not None and source_fps and math.isfinite(source_fps) and source_fps > 0:
        duration_s = num_source_frames / source_fps
        # Past the cap, frames spread over the whole clip (a lower rate) rather than cover
        # only its start: a description should see the whole video.
        count = min(cfg.max_video_frames, max(1, round(duration_s * cfg.video_fps)))
    else:
        count = cfg.video_frames
    indices = _uniform_indices(num_source_frames, count)
    if len(indices) % 2 == 1:
        indices.append(indices[-1])  # Qwen2-VL merges frames in pairs (temporal patch 2)
    return indices


def _import_decord():
    try:
        import decord
    except ImportError as error:
        raise ImportError("reading videos needs decord: pip install decord") from error
    return decord


def _decord_error_kind(message: str) -> str:
    if "cannot find video stream" in message:
        return "no_video_stream"
    if "Invalid frame count" in message:
        return "empty_video"
    return "unreadable_video"


_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ")


def _decord_message(error: Exception) -> str:
    """decord's first message line without its '[12:00:00] /src/file.cc:123: ' prefixes,
    so equal failures read the same in error rows and summaries."""
    lines = str(error).strip().splitlines()
    return _DECORD_LOG_PREFIX.sub("", lines[0]).strip() if lines else type(error).__name__


def _open_reader(decord, path: Path):
    try:
        # AssertionError: decord asserts num_frames > 0 in VideoReader.__init__.
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except (decord.DECORDError, RuntimeError, AssertionError) as error:
        message = _decord_message(error)
        raise MediaError(_decord_error_kind(message), f"{path.name}: {message}") from None


def _read_frames(reader, decord, path: Path, indices: list[int], cfg: MediaConfig):
    """Decodes the frames one at a time and resizes each at once: memory holds one
    full-size frame, not T of them (32 frames of 4K would be ~800 MB)."""
    frames: list[np.ndarray] = []
    decoded: dict[int, np.ndarray] = {}
    source_height = source_width = 0
    for index in indices:
        if index not in decoded:
            try:
                frame = reader.get_batch([index]).asnumpy()[0]
            except (decord.DECORDError, decord.DECORDLimitReachedError, RuntimeError, IndexError) as error:
                message = _decord_message(error)
                raise MediaError("unreadable_video", f"{path.name}: frame {index}: {message}") from None
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise MediaError("unreadable_video", f"{path.name}: unexpected frame {frame.shape} {frame.dtype}")
            if not frames:
                source_height, source_width = frame.shape[:2]
                _check_video_geometry(source_width, source_height, cfg, path)
            decoded[index] = np.asarray(_resize_rgb(Image.fromarray(frame), cfg))
        frames.append(decoded[index])
    return np.stack(frames), source_width, source_height


def _check_video_geometry(width: int, height: int, cfg: MediaConfig, path: Path) -> None:
    try:
        _check_source_geometry(width, height, cfg)
    except MediaError as error:
        kind = "unreadable_video" if error.kind == "unreadable_image" else error.kind
        raise MediaError(kind, f"{path.name}: {error}") from None


def _decode_video(path: Path, cfg: MediaConfig) -> LoadedMedia:
    """decord in this process: open, sample, decode and resize. Only for trusted files or
    inside the helper process (see _VideoDecoderProcess)."""
    decord = _import_decord()
    reader = _open_reader(decord, path)
    num_source_frames = len(reader)
    if num_source_frames < 1:
        raise MediaError("empty_video", f"{path.name}: the video has no frames")
    try:
        source_fps = float(reader.get_avg_fps())
    except Exception:  # noqa: BLE001 - fps is informative only; sampling falls back to N frames
        source_fps = None
    indices = sample_frame_indices(num_source_frames, source_fps, cfg)
    pixels, source_width, source_height = _read_frames(reader, decord, path, indices, cfg)
    return LoadedMedia(
        "video",
        np.ascontiguousarray(pixels),
        source_width,
        source_height,
        frame_indices=indices,
        source_fps=source_fps,
        source_frames=num_source_frames,
    )


# ----------------------------------------------------------------------------- video helper process
#
# Why decord runs in a helper process:
# decord 0.6.0 aborts the whole process on some malformed files. Its VideoReader constructor
# calls frame_ts_.reserve(n) with the frame count the container *claims* (MP4 'stts', AVI
# 'strh' dwLength, or duration x fps for Matroska); a claim of ~2e9 frames throws
# std::bad_alloc, which decord's C API does not catch: "terminate called ... std::bad_alloc",
# SIGABRT, no Python exception. Found by fuzzing (~2,300 mutated mp4/mkv/webm/avi files, each
# read in a subprocess): 3 aborts, all of this kind, 0 hangs, 0 segfaults; every other bad file
# raised a Python exception. Header checks cannot rule it out (the claim comes from FFmpeg's
# container-specific logic), and a Ray worker that aborts loses its whole batch and is
# restarted. So decord runs in one long-lived helper process per worker process: a crash or a
# hang (killed after timeout_s) costs one error row and a helper restart (~0.2 s), never the
# worker. The helper speaks a tiny length-prefixed JSON + raw-bytes protocol over its own
# stdin/stdout (no pickle); frames come back already resized, a few MB per video.

VIDEO_TIMEOUT_S = 300.0
_LENGTH = struct.Struct(">Q")


def _write_message(fd: int, header: dict, payload: bytes = b"") -> None:
    encoded = json.dumps(header).encode("utf-8")
    data = _LENGTH.pack(len(encoded)) + encoded + _LENGTH.pack(len(payload)) + payload
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    """Reads exactly `size` bytes; EOFError if the other side is gone, TimeoutError past deadline."""
    chunks, remaining = [], size
    while remaining:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_message(fd: int, deadline: float | None = None) -> tuple[dict, bytes]:
    header = json.loads(_read_exact(fd, _LENGTH.unpack(_read_exact(fd, _LENGTH.size, deadline))[0], deadline))
    payload = _read_exact(fd, _LENGTH.unpack(_read_exact(fd, _LENGTH.size, deadline))[0], deadline)
    return header, payload


def _serve_video_requests() -> None:
    """The helper's main loop: one request {path, cfg} -> one reply, until stdin closes."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)  # anything a C library prints goes to stderr, never into the protocol
    # Ctrl-C reaches the whole process group: the parent decides; the helper ends on stdin EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            request, _ = _read_message(0)
        except EOFError:
            return  # the parent closed stdin or died
        try:
            media = _decode_video(Path(request["path"]), MediaConfig(**request["cfg"]))
        except MediaError as error:
            _write_message(protocol_fd, {"ok": False, "kind": error.kind, "message": str(error)})
            continue
        except Exception as error:  # noqa: BLE001 - reported to the parent as this file's error
            message = f"{Path(request['path']).name}: {type(error).__name__}: {error}"
            _write_message(protocol_fd, {"ok": False, "kind": "unreadable_video", "message": message})
            continue
        meta = {key: getattr(media, key) for key in ("source_width", "source_height", "frame_indices",
                                                     "source_fps", "source_frames")}
        _write_message(protocol_fd, {"ok": True, "shape": list(media.pixels.shape), **meta}, media.pixels.tobytes())


class _VideoDecoderProcess:
    """The helper process of this process (started on first use, restarted after a crash)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()  # one request at a time on the pipe
        atexit.register(self.stop)

    def decode(self, path: Path, cfg: MediaConfig, timeout_s: float) -> LoadedMedia:
        with self._lock:
            process = self._running_process()
            try:
                request = {"path": os.path.abspath(path), "cfg": dataclasses.asdict(cfg)}
                _write_message(process.stdin.fileno(), request)
                header, payload = _read_message(process.stdout.fileno(), time.monotonic() + timeout_s)
            except TimeoutError:
                self.stop(kill=True)  # it is stuck (or busy with a file we gave up on)
                message = f"{path.name}: decoding took longer than {timeout_s:g} s"
                raise MediaError("unreadable_video", message) from None
            except (EOFError, BrokenPipeError):
                raise MediaError("unreadable_video", f"{path.name}: {self._death_notice()}") from None
        if not header["ok"]:
            raise MediaError(header["kind"], header["message"])
        pixels = np.frombuffer(payload, dtype=np.uint8).reshape(header["shape"])
        return LoadedMedia("video", pixels, header["source_width"], header["source_height"],
                           frame_indices=header["frame_indices"], source_fps=header["source_fps"],
                           source_frames=header["source_frames"])

    def _running_process(self) -> subprocess.Popen:
        if self._owner_pid != os.getpid():
            # Forked after the helper started: its pipes belong to the parent; start our own.
            self._process, self._owner_pid = None, os.getpid()
        if self._process is None or self._process.poll() is not None:
            self._process = self._start()
        return self._process

    @staticmethod
    def _start() -> subprocess.Popen:
        package_parent = str(Path(__file__).resolve().parents[1])
        pythonpath = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, "-c", "from pipelines.media import _serve_video_requests; _serve_video_requests()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # `-c` puts the working directory first on sys.path: run where this very package
            # lives, so the helper cannot pick up some other `pipelines` from the caller's cwd.
            cwd=package_parent,
            env={**os.environ, "PYTHONPATH": pythonpath},
        )

    def _death_notice(self) -> str:
        process, self._process = self._process, None
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return f"the video decoder crashed on this file ({cause}); it is corrupt or hostile"

    def stop(self, kill: bool = False) -> None:
        process, self._process = self._process, None
        if process is None or self._owner_pid != os.getpid():
            return
        if kill:
            process.kill()
        process.stdin.close()  # an idle helper exits on EOF
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


_decoder_process: _VideoDecoderProcess | None = None
_decoder_process_lock = threading.Lock()


def _shared_decoder_process() -> _VideoDecoderProcess:
    global _decoder_process
    with _decoder_process_lock:
        if _decoder_process is None:
            _decoder_process = _VideoDecoderProcess()
        return _decoder_process


def load_video(
    path: Path, cfg: MediaConfig, *, isolated: bool = True, timeout_s: float = VIDEO_TIMEOUT_S
) -> LoadedMedia:
    """Samples, decodes and resizes frames of an untrusted video.

    isolated=True (the default) runs decord in the helper process, so a file that crashes or
    hangs the decoder becomes a MediaError; isolated=False runs it here (trusted files only).
    """
    path = Path(path)
    _check_file_size(path, cfg)
    _check_container(path)
    if not isolated:
        return _decode_video(path, cfg)
    if importlib.util.find_spec("decord") is None:
        _import_decord()  # a missing dependency fails the run here, not as one error row per video
    return _shared_decoder_process().decode(path, cfg, timeout_s)


def load_media(root: "str | Path", relpath: str, cfg: MediaConfig) -> LoadedMedia:
    """Confines `relpath` to `root` (a local folder or a URI: s3://bucket/prefix, ...), then
    loads it as an image or a video by its extension."""
    media_type = media_type_for(relpath)
    if media_type is None:
        known = sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
        raise MediaError("unsupported_type", f"{relpath!r}: extension not in {known}")
    load = load_image if media_type == "image" else load_video
    location = storage.at(root)
    if not location.local:
        with _fetched(location, relpath, cfg) as path:
            return load(path, cfg)
    return load(resolve_inside_root(Path(location.path), relpath), cfg)


def object_inside_root(root: "storage.Loc", relpath: str) -> "storage.Loc":
    """The object `relpath` under a root in object storage; refuses anything that leaves the
    root (an absolute name, `..`; stores have no symlinks) before asking the store about it."""
    if "\x00" in relpath:
        raise MediaError("outside_root", f"path contains a NUL byte: {relpath!r}")
    normal = posixpath.normpath(relpath)
    if relpath.startswith("/") or normal == ".." or normal.startswith("../"):
        raise MediaError("outside_root", f"{relpath!r} resolves outside the input root {root.uri!r}")
    return root / normal


@contextmanager
def _fetched(root: "storage.Loc", relpath: str, cfg: MediaConfig) -> Iterator[Path]:
    """The object copied into a temp folder under its own name (the decoders and their checks
    read local files; messages name the file), size-checked before the download."""
    import tempfile
    from pyarrow.fs import FileType
    obj = object_inside_root(root, relpath)
    info = obj.fs.get_file_info(obj.path)
    if info.type != FileType.File:
        raise MediaError("not_found", f"{relpath!r} does not exist under {root.uri!r}"
                         if info.type == FileType.NotFound else f"{relpath!r} is not a file")
    if info.size == 0:
        raise MediaError("empty_file", f"{obj.uri} is empty (0 bytes)")
    if info.size > cfg.max_file_bytes:
        raise MediaError("too_large", f"{obj.uri} is {info.size} bytes, above max_file_bytes={cfg.max_file_bytes}")
    try:   # bounded: an object replaced by a larger one after the check is refused too
        data = obj.read_bytes(limit=cfg.max_file_bytes)
    except ValueError:
        raise MediaError("too_large", f"{obj.uri} is above max_file_bytes={cfg.max_file_bytes}") from None
    with tempfile.TemporaryDirectory(prefix="leccr-media-") as folder:
        path = Path(folder) / obj.name
        path.write_bytes(data)
        yield path


# ----------------------------------------------------------------------------- transport


def encode_pixels(pixels: np.ndarray) -> tuple[bytes, list[int]]:
    """(raw bytes, shape): how Ray Data moves ragged uint8 arrays (one binary + one list column)."""
    array = np.ascontiguousarray(pixels, dtype=np.uint8)
    return array.tobytes(), list(array.shape)


def decode_pixels(data: bytes, shape: list[int]) -> np.ndarray:
    """Inverse of encode_pixels; refuses a shape that does not match the byte count."""
    expected = math.prod(int(d) for d in shape)
    if len(data) != expected:
        raise ValueError(f"pixel buffer has {len(data)} bytes, shape {list(shape)} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8).reshape([int(d) for d in shape])
