"""Writes the bad (and a few good) media files the loader must survive. A helper, not tests.

Every file is small on disk and made in well under a second in total, so tests can build
them in a tmp_path each run instead of keeping binaries in the repository.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.sample_data import make_video

# Colours of known patches, so tests can check what a loader returns.
RED = (220, 30, 30)
BLUE = (30, 70, 220)
GOOD_VIDEO_FRAMES = 20  # 2 s at 10 fps
GOOD_VIDEO_SIZE = (160, 120)  # width, height
BOMB_SIZE = (20000, 20000)  # 400 Mpx: PIL itself raises DecompressionBombError
BOMB_WARNING_SIZE = (10000, 10000)  # 100 Mpx: only PIL's warning zone (89.5 .. 179 Mpx)
PANORAMA_SIZE = (16000, 1000)

# what each bad input must become in a describe run (the rest of make_bad_media's files must be described)
EXPECTED_ERRORS = {
    "zero_byte.jpg": "empty_file", "truncated.jpg": "unreadable_image", "text_named.jpg": "unreadable_image",
    "bomb.png": "decompression_bomb", "bomb_warning.png": "decompression_bomb",
    "corrupt.mp4": "unreadable_video", "truncated.mp4": "unreadable_video",
    "huge_frame_count.mp4": "unreadable_video", "huge_frame_count.avi": "unreadable_video",
    "audio_only.mp4": "no_video_stream", "zero_frames.mp4": "empty_video", "text_named.mp4": "unreadable_video",
    "link_out.jpg": "outside_root",
}


def moving_square_frames(count: int = GOOD_VIDEO_FRAMES, size: tuple[int, int] = GOOD_VIDEO_SIZE) -> np.ndarray:
    """A red square moving right on blue: frame k has the square's left edge at 5 * k."""
    width, height = size
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    frames[:] = BLUE
    for index in range(count):
        frames[index, 40:80, 5 * index : 5 * index + 30] = RED
    return frames


def _jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save_args)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of all-black rows: tens of KB on disk, width * height pixels.

    Written chunk by chunk because building it with PIL would allocate the full image
    (PIL keeps mode "1" at one byte per pixel: 400 MB for 20000 x 20000).
    """
    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0 + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = 512
    pieces = [compressor.compress(row * min(rows_per_chunk, height - start))
              for start in range(0, height, rows_per_chunk)]
    pieces.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit, grayscale
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(pieces))
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


def _write_audio_only_mp4(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
        for start in range(0, tone.size, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _write_zero_frame_mp4(path: Path) -> Path:
    """An MP4 with an H.264 video track holding no samples.

    The plain mp4 muxer drops a track without samples (the file would have no stream at
    all); with movflags=empty_moov it writes the track header up front, so the file has a
    video stream of 0 frames, like an encoder that died before its first frame.
    """
    import av

    with av.open(str(path), "w", options={"movflags": "empty_moov"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = GOOD_VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


def _write_corrupt_mp4(path: Path, good: bytes) -> Path:
    """The good MP4 with the middle half of its frame data (mdat) overwritten by zeros.

    The index (moov) stays intact, so the file opens and the decoder itself meets garbage:
    the harder case (a cut-off moov is caught before decoding, see truncated.mp4).
    """
    start = good.index(b"mdat") + 4
    end = good.index(b"moov") - 4
    quarter = (end - start) // 4
    path.write_bytes(good[: start + quarter] + bytes(2 * quarter) + good[start + 3 * quarter :])
    return path


def _patch_u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack(">I" if data[:4] != b"RIFF" else "<I", value) + data[offset + 4 :]


def write_huge_frame_count_mp4(path: Path, good: bytes) -> Path:
    """The good MP4 whose 'stts' claims ~2e9 frames. decord reserves memory for the claimed
    count in its constructor, and its std::bad_alloc aborts the process (SIGABRT)."""
    stts = good.index(b"stts") + 4  # payload: version/flags, entry_count, (count, delta)...
    path.write_bytes(_patch_u32(good, stts + 8, 0x7FFF_FFF0))
    return path


def write_huge_frame_count_avi(path: Path, good: bytes) -> Path:
    """The good AVI whose video 'strh' dwLength claims ~2e9 frames: same abort as above."""
    strh = good.index(b"strh") + 8  # after fourcc and chunk size
    path.write_bytes(_patch_u32(good, strh + 32, 0x7F00_0000))  # dwLength
    return path


def _write_images(directory: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[name] = directory / name
        files[name].write_bytes(data)

    put("zero_byte.jpg", b"")
    good_jpeg = _jpeg_bytes(Image.new("RGB", (64, 48), RED))
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
    put("text_named.jpg", b"this is a caption file, not a JPEG\n" * 20)
    # C=0 M=255 Y=255 K=0 is pure red in naive CMYK -> RGB.
    put("cmyk.jpg", _jpeg_bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0))))

    # 16-bit grayscale: three vertical bands 0 | 32768 | 65535.
    bands = np.zeros((30, 60), dtype=np.uint16)
    bands[:, 20:40], bands[:, 40:] = 32768, 65535
    files["png16.png"] = directory / "png16.png"
    Image.fromarray(bands).save(files["png16.png"])

    # Palette image: index 0 transparent (and black), index 1 opaque red; red in the left half.
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    palette.paste(1, (0, 0, 20, 40))
    files["palette_transparent.png"] = directory / "palette_transparent.png"
    palette.save(files["palette_transparent.png"], transparency=0)

    # Stored landscape 64x32 (red left half, blue right half), EXIF orientation 6 = rotate 90 CW.
    landscape = Image.new("RGB", (64, 32), BLUE)
    landscape.paste(RED, (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", _jpeg_bytes(landscape, exif=exif.tobytes()))

    files["bomb.png"] = write_bomb_png(directory / "bomb.png", *BOMB_SIZE)
    files["bomb_warning.png"] = write_bomb_png(directory / "bomb_warning.png", *BOMB_WARNING_SIZE)
    files["one_by_one.png"] = directory / "one_by_one.png"
    Image.new("RGB", (1, 1), RED).save(files["one_by_one.png"])
    put("panorama.jpg", _jpeg_bytes(Image.new("RGB", PANORAMA_SIZE, BLUE)))

    # Animated GIF and WebP: frame 0 red, frame 1 blue; the loader must return frame 0.
    for name, extra in (("good.gif", {}), ("good.webp", {"lossless": True})):
        frames = [Image.new("RGB", (48, 32), RED), Image.new("RGB", (48, 32), BLUE)]
        files[name] = directory / name
        frames[0].save(files[name], save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return files


def _write_videos(directory: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    frames = moving_square_frames()
    for extension in ("mp4", "webm", "mkv", "avi"):
        files[f"good.{extension}"] = make_video(directory / f"good.{extension}", frames, fps=10)
    # MP4 layouts seen in the wild: index first (web "faststart") and fragmented (DASH/CMAF,
    # samples in 'moof' boxes, none in the 'moov' index).
    files["good_faststart.mp4"] = make_video(directory / "good_faststart.mp4", frames, fps=10,
                                             container_options={"movflags": "faststart"})
    files["good_fragmented.mp4"] = make_video(directory / "good_fragmented.mp4", frames, fps=10,
                                              container_options={"movflags": "frag_keyframe+empty_moov"})
    files["one_frame.mp4"] = make_video(directory / "one_frame.mp4", frames[:1], fps=10)
    files["corrupt.mp4"] = _write_corrupt_mp4(directory / "corrupt.mp4", files["good.mp4"].read_bytes())
    files["truncated.mp4"] = directory / "truncated.mp4"
    files["truncated.mp4"].write_bytes(files["good.mp4"].read_bytes()[:1000])
    files["huge_frame_count.mp4"] = write_huge_frame_count_mp4(directory / "huge_frame_count.mp4",
                                                               files["good.mp4"].read_bytes())
    files["huge_frame_count.avi"] = write_huge_frame_count_avi(directory / "huge_frame_count.avi",
                                                               files["good.avi"].read_bytes())
    files["audio_only.mp4"] = _write_audio_only_mp4(directory / "audio_only.mp4")
    files["zero_frames.mp4"] = _write_zero_frame_mp4(directory / "zero_frames.mp4")
    files["text_named.mp4"] = directory / "text_named.mp4"
    files["text_named.mp4"].write_bytes(b"#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:0\nfile:///etc/passwd\n")
    return files


def make_bad_media(directory: Path) -> dict[str, Path]:
    """Writes every case into `directory`; returns {file name: path}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {**_write_images(directory), **_write_videos(directory)}
