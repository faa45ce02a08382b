"""pipelines.media on hostile inputs, path confinement, transport, and the sample dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.media import (
    LoadedMedia,
    MediaConfig,
    MediaError,
    decode_pixels,
    encode_pixels,
    load_image,
    load_media,
    load_video,
    media_type_for,
    resolve_inside_root,
    sample_frame_indices,
    target_size,
)
from tests.bad_media import BLUE, BOMB_SIZE, GOOD_VIDEO_FRAMES, PANORAMA_SIZE, RED, make_bad_media, moving_square_frames

CFG = MediaConfig()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return make_bad_media(tmp_path_factory.mktemp("bad_media"))


def assert_error(kind: str, load, *args, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as caught:
        load(*args, **kwargs)
    assert caught.value.kind == kind, str(caught.value)
    assert str(caught.value)  # a readable reason for the error row
    return caught.value


def assert_close(pixel, expected, tolerance: int = 12) -> None:
    assert np.abs(np.asarray(pixel, dtype=int) - np.asarray(expected)).max() <= tolerance, (pixel, expected)


def assert_image_contract(media: LoadedMedia, cfg: MediaConfig = CFG) -> None:
    height, width, channels = media.pixels.shape
    assert media.media_type == "image" and media.pixels.dtype == np.uint8 and channels == 3
    assert height * width <= cfg.max_pixels and min(height, width) >= cfg.min_side


# ----------------------------------------------------------------------------- small pieces


def test_media_type_for_uses_the_lowercase_extension():
    assert media_type_for("a/B.JPG") == "image"
    assert media_type_for("clip.WebM") == "video"
    assert media_type_for("notes.txt") is None
    assert media_type_for("no_extension") is None


def test_target_size_bounds_area_and_short_side():
    assert target_size(448, 448, CFG) == (448, 448)
    width, height = target_size(4000, 3000, CFG)
    assert width * height <= CFG.max_pixels and abs(width / height - 4 / 3) < 0.01
    assert target_size(1, 1, CFG) == (28, 28)
    assert target_size(5600, 28, CFG) == (5600, 28)  # aspect 200 fits both bounds


def test_media_error_keeps_its_kind_through_pickle():
    import pickle

    error = pickle.loads(pickle.dumps(MediaError("too_large", "big")))
    assert (error.kind, str(error)) == ("too_large", "big")


def test_encode_decode_round_trip():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 30, 40, 3), dtype=np.uint8)
    data, shape = encode_pixels(pixels)
    assert isinstance(data, bytes) and shape == [4, 30, 40, 3]
    assert np.array_equal(decode_pixels(data, shape), pixels)
    with pytest.raises(ValueError):
        decode_pixels(data[:-1], shape)


# ----------------------------------------------------------------------------- bad images


def test_zero_byte_file(bad):
    assert_error("empty_file", load_image, bad["zero_byte.jpg"], CFG)


def test_file_over_the_size_limit(bad):
    assert_error("too_large", load_image, bad["cmyk.jpg"], MediaConfig(max_file_bytes=100))


def test_truncated_jpeg_is_unreadable(bad):
    assert_error("unreadable_image", load_image, bad["truncated.jpg"], CFG)


def test_text_file_named_jpg_is_unreadable(bad):
    assert_error("unreadable_image", load_image, bad["text_named.jpg"], CFG)


def test_cmyk_jpeg_becomes_plausible_rgb(bad):
    media = load_image(bad["cmyk.jpg"], CFG)
    assert_image_contract(media)
    assert_close(media.pixels[10, 10], (255, 0, 0), tolerance=20)


def test_16_bit_png_scales_to_8_bit(bad):
    media = load_image(bad["png16.png"], CFG)
    assert_image_contract(media)
    # Upscaled 30x60 -> 28-pixel short side is already met; sample band centres.
    row = media.pixels[media.pixels.shape[0] // 2]
    width = row.shape[0]
    assert tuple(row[width // 6]) == (0, 0, 0)
    assert abs(int(row[width // 2][0]) - 128) <= 1
    assert tuple(row[5 * width // 6]) == (255, 255, 255)


def test_palette_transparency_is_white(bad):
    media = load_image(bad["palette_transparent.png"], CFG)
    assert_image_contract(media)
    assert_close(media.pixels[20, 5], RED, tolerance=2)
    assert tuple(media.pixels[20, 35]) == (255, 255, 255)


def test_exif_orientation_is_applied(bad):
    media = load_image(bad["exif_rotated.jpg"], CFG)
    height, width = media.pixels.shape[:2]
    assert height > width and (media.source_width, media.source_height) == (32, 64)
    # Stored red-left / blue-right, rotated 90 degrees clockwise: red on top, blue below.
    assert_close(media.pixels[5, width // 2], RED, tolerance=25)
    assert_close(media.pixels[-5, width // 2], BLUE, tolerance=25)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, we refuse
def test_bomb_png_is_refused(bad):
    started = time.perf_counter()
    assert_error("decompression_bomb", load_image, bad["bomb.png"], CFG)
    assert_error("decompression_bomb", load_image, bad["bomb_warning.png"], CFG)  # PIL only warns there
    assert time.perf_counter() - started < 1.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from Linux /proc")
def test_bomb_png_is_refused_without_allocating(bad):
    """Peak memory of a fresh process stays far below the 400 MB the bomb would decode to."""
    script = textwrap.dedent(
        f"""
        from pipelines.media import MediaConfig, MediaError, load_image
        try:
            load_image({str(bad['bomb.png'])!r}, MediaConfig(max_source_pixels=10**12))
        except MediaError as error:
            print(error.kind)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest).
        peak_kib = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
        print(int(peak_kib) // 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    kind, peak_mib = result.stdout.split()
    # Even with our own limit lifted, PIL's limit (2x MAX_IMAGE_PIXELS) stops it at the header.
    assert kind == "decompression_bomb"
    assert int(peak_mib) < 200, result.stdout
    assert BOMB_SIZE[0] * BOMB_SIZE[1] > 2 * 89_478_485


def test_one_by_one_image_is_upscaled(bad):
    media = load_image(bad["one_by_one.png"], CFG)
    assert media.pixels.shape == (28, 28, 3)
    assert_close(media.pixels[14, 14], RED, tolerance=2)


def test_panorama_is_downscaled(bad):
    media = load_image(bad["panorama.jpg"], CFG)
    assert_image_contract(media)
    height, width = media.pixels.shape[:2]
    assert (media.source_width, media.source_height) == PANORAMA_SIZE
    assert abs(width / height - 16) < 0.2


def test_extreme_aspect_ratio_is_refused(tmp_path):
    from PIL import Image

    Image.new("RGB", (2010, 10)).save(tmp_path / "strip.png")
    assert_error("bad_aspect_ratio", load_image, tmp_path / "strip.png", CFG)


@pytest.mark.parametrize("name", ["good.gif", "good.webp"])
def test_animated_image_gives_its_first_frame(bad, name):
    media = load_image(bad[name], CFG)
    assert_image_contract(media)
    assert_close(media.pixels[10, 10], RED, tolerance=10)


def test_misnamed_image_is_read_by_content(bad, tmp_path):
    png_named_jpg = tmp_path / "really_png.jpg"
    png_named_jpg.write_bytes(bad["one_by_one.png"].read_bytes())
    assert load_image(png_named_jpg, CFG).pixels.shape == (28, 28, 3)


# ----------------------------------------------------------------------------- videos


@pytest.mark.parametrize(
    "name", ["good.mp4", "good.webm", "good.mkv", "good.avi", "good_faststart.mp4", "good_fragmented.mp4"]
)
def test_good_video_gives_uniform_even_frames(bad, name):
    media = load_video(bad[name], CFG)
    frames, height, width, channels = media.pixels.shape
    assert media.media_type == "video" and media.pixels.dtype == np.uint8 and channels == 3
    assert frames == 8 and height * width <= CFG.max_pixels
    assert media.source_frames == GOOD_VIDEO_FRAMES and media.source_fps == pytest.approx(10)
    assert media.frame_indices == [int((i + 0.5) * GOOD_VIDEO_FRAMES / 8) for i in range(8)]
    # The content follows the indices: the red square's left edge sits at 5 * index.
    expected = moving_square_frames()[media.frame_indices]
    assert np.abs(media.pixels.astype(int) - expected.astype(int)).mean() < 6


def test_video_frames_are_resized_to_max_pixels(bad):
    cfg = MediaConfig(max_pixels=64 * 48, video_frames=3)
    media = load_video(bad["good.mp4"], cfg)
    assert media.pixels.shape == (4, 48, 64, 3)  # 3 frames -> 4: T must be even
    assert media.frame_indices[-1] == media.frame_indices[-2]


def test_one_frame_video_gives_two_copies(bad):
    media = load_video(bad["one_frame.mp4"], CFG)
    assert media.pixels.shape[0] == 2 and media.frame_indices == [0, 0]
    assert np.array_equal(media.pixels[0], media.pixels[1])


def test_fps_sampling_is_capped():
    assert sample_frame_indices(20, 10.0, MediaConfig(video_fps=2.0)) == [2, 7, 12, 17]
    capped = sample_frame_indices(3000, 30.0, MediaConfig(video_fps=2.0, max_video_frames=32))
    assert len(capped) == 32 and capped[0] < 100 and capped[-1] > 2900  # spread over the clip
    assert sample_frame_indices(5, 0.0, MediaConfig(video_fps=2.0, video_frames=4)) == [0, 1, 3, 4]
    assert len(sample_frame_indices(7, 10.0, MediaConfig(video_fps=1.0))) == 2  # round 0.7 -> 1 -> even 2


def test_corrupt_video_is_unreadable_and_decord_stays_healthy(bad):
    error = assert_error("unreadable_video", load_video, bad["corrupt.mp4"], CFG)
    assert "/github/workspace" not in str(error)  # decord's "[time] file.cc:line:" prefix is stripped
    assert load_video(bad["good.mp4"], CFG).pixels.shape[0] == 8


@pytest.mark.parametrize("name", ["huge_frame_count.mp4", "huge_frame_count.avi"])
def test_decoder_crash_is_an_error_not_a_dead_worker(bad, name):
    error = assert_error("unreadable_video", load_video, bad[name], CFG)
    assert "crashed" in str(error) and "SIGABRT" in str(error)
    assert load_video(bad["good.mp4"], CFG).pixels.shape[0] == 8  # the helper was restarted


def test_decord_really_aborts_in_process_on_a_huge_frame_count(bad):
    """Why load_video isolates decord (see media.py). If this starts failing, decord stopped
    aborting on this file: the helper process may no longer be needed."""
    path = str(bad["huge_frame_count.mp4"])
    script = f"from pipelines.media import *; load_video({path!r}, MediaConfig(), isolated=False)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == -signal.SIGABRT and "std::bad_alloc" in result.stderr


def test_isolated_and_in_process_decoding_agree(bad):
    isolated = load_video(bad["good.mkv"], CFG)
    in_process = load_video(bad["good.mkv"], CFG, isolated=False)
    assert np.array_equal(isolated.pixels, in_process.pixels)
    assert isolated.frame_indices == in_process.frame_indices and isolated.source_fps == in_process.source_fps


def test_slow_decode_times_out_and_the_helper_restarts(bad):
    error = assert_error("unreadable_video", load_video, bad["good.mp4"], CFG, timeout_s=1e-4)
    assert "longer than" in str(error)
    assert load_video(bad["good.mp4"], CFG).pixels.shape[0] == 8


def test_truncated_video_is_unreadable(bad):
    assert_error("unreadable_video", load_video, bad["truncated.mp4"], CFG)


def test_audio_only_file_has_no_video_stream(bad):
    assert_error("no_video_stream", load_video, bad["audio_only.mp4"], CFG)


def test_zero_frame_video_is_empty(bad):
    assert_error("empty_video", load_video, bad["zero_frames.mp4"], CFG)


def test_playlist_named_mp4_never_reaches_ffmpeg(bad):
    assert_error("unreadable_video", load_video, bad["text_named.mp4"], CFG)


def test_zero_byte_video(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert_error("empty_file", load_video, tmp_path / "empty.mp4", CFG)


def test_audio_only_matroska_has_no_video_stream(tmp_path):
    """Outside MP4 the classification comes from decord's own message."""
    import av

    path = tmp_path / "audio.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    assert_error("no_video_stream", load_video, path, CFG)


# ----------------------------------------------------------------------------- path confinement


@pytest.fixture
def media_root(tmp_path, bad) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(bad["one_by_one.png"].read_bytes())
    (tmp_path / "outside.png").write_bytes(bad["one_by_one.png"].read_bytes())
    return root


def test_parent_escape_is_refused(media_root):
    assert_error("outside_root", resolve_inside_root, media_root, "../outside.png")
    assert_error("outside_root", resolve_inside_root, media_root, "sub/../../outside.png")


def test_absolute_path_outside_is_refused(media_root):
    assert_error("outside_root", resolve_inside_root, media_root, str(media_root.parent / "outside.png"))
    assert_error("outside_root", resolve_inside_root, media_root, "/etc/passwd")


def test_symlink_pointing_outside_is_refused(media_root):
    (media_root / "link.png").symlink_to(media_root.parent / "outside.png")
    (media_root / "dirlink").symlink_to(media_root.parent)
    assert_error("outside_root", resolve_inside_root, media_root, "link.png")
    assert_error("outside_root", resolve_inside_root, media_root, "dirlink/outside.png")


def test_symlink_inside_root_is_fine(media_root):
    (media_root / "alias.png").symlink_to(media_root / "sub" / "a.png")
    assert resolve_inside_root(media_root, "alias.png") == (media_root / "sub" / "a.png").resolve()
    assert load_media(media_root, "alias.png", CFG).pixels.shape == (28, 28, 3)


def test_root_itself_being_a_symlink_is_fine(media_root, tmp_path):
    (tmp_path / "root_link").symlink_to(media_root)
    assert resolve_inside_root(tmp_path / "root_link", "sub/a.png") == (media_root / "sub" / "a.png").resolve()


def test_missing_and_non_regular_files(media_root):
    assert_error("not_found", resolve_inside_root, media_root, "sub/missing.png")
    assert_error("not_found", resolve_inside_root, media_root, "sub")
    assert_error("not_found", resolve_inside_root, media_root, ".")
    os.mkfifo(media_root / "fifo.png")  # opening it would block forever
    assert_error("not_found", resolve_inside_root, media_root, "fifo.png")
    assert_error("outside_root", resolve_inside_root, media_root, "a\x00.png")


def test_load_media_dispatches_and_refuses_unknown_types(media_root, bad):
    assert load_media(media_root, "sub/a.png", CFG).media_type == "image"
    (media_root / "notes.txt").write_text("hello")
    assert_error("unsupported_type", load_media, media_root, "notes.txt", CFG)
    assert_error("outside_root", load_media, media_root, "../outside.png", CFG)


# ----------------------------------------------------------------------------- sample dataset


def test_sample_dataset_is_deterministic_and_loadable(tmp_path):
    from pipelines.sample_data import VIDEO_ID_OFFSET, make_sample_dataset

    first = make_sample_dataset(tmp_path / "a", n_images=6, n_videos=2, seed=3, video_seconds=1.0)
    second = make_sample_dataset(tmp_path / "b", n_images=6, n_videos=2, seed=3, video_seconds=1.0)
    other = make_sample_dataset(tmp_path / "c", n_images=6, n_videos=0, seed=4)
    for name in ("annotations/captions_train.json", "annotations/scenes.json", "images/000000000001.jpg",
                 "videos/000001.mp4"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    captions_json = first / "annotations" / "captions_train.json"
    assert captions_json.read_bytes() != (other / "annotations" / "captions_train.json").read_bytes()

    coco = json.loads(captions_json.read_text())
    ids = [entry["id"] for entry in coco["images"]]
    assert ids == [1, 2, 3, 4, 5, 6, VIDEO_ID_OFFSET + 1, VIDEO_ID_OFFSET + 2]
    per_item = {i: [a["caption"] for a in coco["annotations"] if a["image_id"] == i] for i in ids}
    assert all(2 <= len(c) <= 3 and len(set(c)) == len(c) for c in per_item.values())
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])

    for entry in coco["images"]:
        media = load_media(first, entry["file_name"], CFG)
        assert media.source_width == entry["width"] and media.source_height == entry["height"]
        if media.media_type == "video":
            assert media.source_frames == 10 and media.pixels.shape[0] == 8


def test_sample_captions_tell_the_truth(tmp_path):
    """Each caption names the colours and shapes of its scene, and the drawn pixels agree."""
    from pipelines.sample_data import COLORS, make_sample_dataset

    root = make_sample_dataset(tmp_path / "s", n_images=8, n_videos=1, seed=1, video_seconds=1.0)
    scenes = {s["id"]: s for s in json.loads((root / "annotations" / "scenes.json").read_text())["items"]}
    coco = json.loads((root / "annotations" / "captions_train.json").read_text())
    for annotation in coco["annotations"]:
        scene = scenes[annotation["image_id"]]
        for shape in scene["shapes"]:
            assert shape["shape"] in annotation["caption"] and shape["color"] in annotation["caption"]
    for scene in scenes.values():
        if scene["media_type"] != "image":
            continue
        pixels = load_image(root / scene["file_name"], MediaConfig(max_pixels=10**6)).pixels
        assert_close(pixels[0, 0], COLORS[scene["background"]], tolerance=30)
        for shape in scene["shapes"]:
            x, y = (round(v) for v in shape["center"])
            assert_close(pixels[y, x], COLORS[shape["color"]], tolerance=30)


def test_sample_videos_without_pyav_fail_early_with_a_hint(tmp_path, monkeypatch):
    from pipelines.sample_data import make_sample_dataset

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(ImportError, match="pip install av"):
        make_sample_dataset(tmp_path / "s", n_images=1, n_videos=1)
    assert make_sample_dataset(tmp_path / "images_only", n_images=2, n_videos=0).is_dir()
