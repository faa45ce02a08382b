"""TIFF and BMP images: read with the same safety checks as JPEG/PNG (header-size bomb check,
corrupt data as an error row), a multi-page TIFF gives its first page, and training reads
them too (leccr_core.data)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.media import MediaConfig, MediaError, load_image, media_type_for

CFG = MediaConfig()
RED, GREEN, BLUE = (220, 30, 30), (30, 160, 50), (30, 70, 220)


def _close(pixel, expected, tolerance=3) -> bool:
    return int(np.abs(np.asarray(pixel, dtype=int) - np.asarray(expected)).max()) <= tolerance


def _tiff_header_only(path: Path, width: int, height: int) -> Path:
    """A baseline little-endian TIFF whose header claims width x height 8-bit grey pixels, with
    only 16 bytes of strip data: a decompression bomb if anything decoded it."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 0), (278, 4, height), (279, 4, width * height)]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    entries[5] = (273, 4, data_offset)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + struct.pack("<I", 0) + bytes(16))
    return path


def test_tiff_and_bmp_are_images():
    for name in ("scan.tif", "scan.TIFF", "old.bmp"):
        assert media_type_for(name) == "image"


def test_bmp_is_read(tmp_path):
    Image.new("RGB", (64, 48), RED).save(tmp_path / "a.bmp")
    media = load_image(tmp_path / "a.bmp", CFG)
    assert media.pixels.shape == (48, 64, 3) and _close(media.pixels[10, 10], RED, 0)


def test_multi_page_tiff_gives_its_first_page(tmp_path):
    pages = [Image.new("RGB", (40, 30), c) for c in (GREEN, RED, BLUE)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:], compression="tiff_lzw")
    with Image.open(tmp_path / "stack.tif") as im:
        assert im.n_frames == 3                                   # really three pages
    media = load_image(tmp_path / "stack.tif", CFG)
    assert (media.source_width, media.source_height) == (40, 30)
    assert _close(media.pixels[5, 5], GREEN, 0)


def test_16_bit_grey_tiff_scales_to_8_bit(tmp_path):
    ramp = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 32).astype(np.uint16)   # up to 65504
    Image.fromarray(ramp).save(tmp_path / "deep.tiff")
    media = load_image(tmp_path / "deep.tiff", CFG)
    assert media.pixels.dtype == np.uint8 and media.pixels.max() >= 250 and media.pixels.min() <= 2


def test_tiff_bomb_is_refused_from_its_header(tmp_path):
    bomb = _tiff_header_only(tmp_path / "bomb.tif", 60_000, 60_000)           # 3.6 G pixels claimed
    started = time.perf_counter()
    with pytest.raises(MediaError) as caught:
        load_image(bomb, CFG)
    assert caught.value.kind == "decompression_bomb"
    assert time.perf_counter() - started < 1.0


def test_truncated_tiff_is_an_error_row(tmp_path):
    Image.new("RGB", (200, 200), RED).save(tmp_path / "full.tif")
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError) as caught:
        load_image(tmp_path / "cut.tif", CFG)
    assert caught.value.kind == "unreadable_image" and "cut.tif" in str(caught.value)


def test_training_reads_tiff_first_page_and_bmp(tmp_path):
    from leccr_core.data import MediaLoadError
    from leccr_core.data import load_image as load_training_image
    pages = [Image.new("RGB", (20, 20), c) for c in (BLUE, RED)]
    pages[0].save(tmp_path / "t.tiff", save_all=True, append_images=pages[1:])
    Image.new("RGB", (20, 20), GREEN).save(tmp_path / "b.bmp")
    assert _close(load_training_image(tmp_path / "t.tiff").getpixel((3, 3)), BLUE, 0)
    assert _close(load_training_image(tmp_path / "b.bmp").getpixel((3, 3)), GREEN, 0)
    with pytest.raises(MediaLoadError, match="over the limit|DecompressionBomb"):
        load_training_image(_tiff_header_only(tmp_path / "bomb.tif", 60_000, 60_000))
