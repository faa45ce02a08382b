"""Datasets for training and evaluation: caption and description preprocessing, CLIP image
preprocessing (PIL + torch, no torchvision), media loading, batching and a description-feature
cache.

Records are plain dataclasses built by the caller (the train/evaluate stages read the working
folder's Parquet files); this module never imports ``pipelines``. Randomness is per sample:
a training sample's augmentation draws from ``random.Random(f"{seed}:{epoch}:{index}")``, so
the batches do not depend on DataLoader workers, world size or where a run was resumed.
"""

from __future__ import annotations

import os
import random
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Decoders PIL may use for training media (the describe stage refuses the same others).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")   # TIFF: its first page
MAX_SOURCE_PIXELS = 89_478_485


class MediaLoadError(RuntimeError):
    """A media file named by the manifest cannot be read (path, reason)."""


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing that training and evaluation must share (saved in every checkpoint)."""
    views: tuple[str, ...] = ("detailed",)   # description views, in slot-input order; () = no description input
    # Several views in training: "all" feeds every view at every step (BERT runs B * V
    # sequences); "random" feeds one view per item per step, drawn from the item's non-missing
    # views (ours; the cost of one view). Evaluation always feeds all views.
    view_sampling: str = "all"
    caption_max_words: int = 30
    caption_max_tokens: int = 64             # after the word cap (CJK captions have no spaces)
    desc_max_tokens: int = 200               # [CLS] + tokens + [SEP], train and test alike
    image_size: int = 384
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    video_frames: int = 8                    # uniform frames per video (clip_frames input)
    video_features: str | None = None        # folder of per-video feature arrays (features input)

    def __post_init__(self):
        if self.view_sampling not in ("all", "random"):
            raise ValueError(f"view_sampling={self.view_sampling!r}; expected 'all' or 'random'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("views", "crop_scale", "crop_ratio"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# ---------------------------------------------------------------------------- records

@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    media_type: str                       # image | video
    root: str                             # manifest root (absolute)
    relpath: str                          # confined to root when loaded
    descriptions: tuple[str | None, ...]  # one per DataConfig.views; None = no such description
    features: str | None = None           # video features input: the item's [T, d] .npy file (absolute)


@dataclass(frozen=True)
class PairRecord:
    """One training row: an English caption of item ``item`` and its translation."""
    item: int                             # index into the dataset's items
    src: str
    tgt: str


@dataclass(frozen=True)
class CaptionRecord:
    caption_id: str
    item: int                             # index into the evaluation items
    text: str


@dataclass
class EvalSet:
    items: list[ItemRecord]
    captions: list[CaptionRecord]
    name: str = "val"


# ---------------------------------------------------------------------------- text

def clean_caption(text: str | None, max_words: int = 30) -> str:
    """Lowercase, strip punctuation (every Unicode P* character becomes a space), collapse
    whitespace, keep at most ``max_words`` whitespace-separated words."""
    text = (text or "").lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split()[:max_words])


def _specials(tokenizer) -> tuple[int, int]:
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the text tokenizer has no [CLS]/[SEP] (or BOS/EOS) tokens")
    return cls_id, sep_id


def encode_text(tokenizer, text: str, max_tokens: int) -> list[int]:
    """[CLS] + at most max_tokens - 2 tokens + [SEP]. Empty text still gives [CLS][SEP]: the
    slot generator needs at least one unmasked token per description."""
    cls_id, sep_id = _specials(tokenizer)
    body = tokenizer(text or "", add_special_tokens=False)["input_ids"] if text else []
    return [cls_id, *body[:max(0, max_tokens - 2)], sep_id]


def encode_caption(tokenizer, text: str, cfg: DataConfig) -> list[int]:
    return encode_text(tokenizer, clean_caption(text, cfg.caption_max_words), cfg.caption_max_tokens)


def encode_descriptions(tokenizer, descriptions: Sequence[str | None], cfg: DataConfig) -> list[list[int]]:
    """One token list per view. A missing view (None) is empty (all padding: "no view"),
    unless every view is missing: then the first is [CLS][SEP], an empty description."""
    out = [encode_text(tokenizer, d, cfg.desc_max_tokens) if d is not None else [] for d in descriptions]
    if not any(out):
        out[0] = encode_text(tokenizer, "", cfg.desc_max_tokens)
    return out


def pad(seqs: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (ids [n, L], mask [n, L]) with 1 = real token."""
    L = max(1, length or max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def pad_views(per_item: Sequence[Sequence[Sequence[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Items' per-view token lists -> [B, L] (one view) or [B, V, L] (several)."""
    V = len(per_item[0])
    L = max((len(s) for views in per_item for s in views), default=1)
    flat = [s for views in per_item for s in views]
    ids, mask = pad(flat, L, pad_id)
    if V == 1:
        return ids, mask
    return ids.view(len(per_item), V, -1), mask.view(len(per_item), V, -1)


# ---------------------------------------------------------------------------- media

def resolve_media(root: str, relpath: str) -> Path:
    """root/relpath with symlinks and '..' resolved; it must stay inside root."""
    base = Path(root).resolve()
    path = (base / relpath).resolve()
    if path != base and base not in path.parents:
        raise MediaLoadError(f"{relpath!r} leaves the media root {base}")
    return path


def load_image(path: Path) -> Image.Image:
    """An RGB image, EXIF orientation applied; only the allowed decoders; bounded pixels."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            if im.width * im.height > MAX_SOURCE_PIXELS:
                raise MediaLoadError(f"{path}: {im.width}x{im.height} pixels is over the limit")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, im)
            return im.convert("RGB")
    except MediaLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is this file's problem
        raise MediaLoadError(f"{path}: {type(err).__name__}: {err}") from None


def uniform_indices(n_source: int, count: int) -> list[int]:
    """``count`` frame indices at the centres of equal segments (repeats when too few frames)."""
    if n_source <= 0:
        return []
    return [min(n_source - 1, int((k + 0.5) * n_source / count)) for k in range(count)]


def load_video_frames(path: Path, count: int) -> list[Image.Image]:
    """``count`` uniformly spaced RGB frames, decoded with decord."""
    try:
        import decord
        reader = decord.VideoReader(str(path), num_threads=1)
        idx = uniform_indices(len(reader), count)
        if not idx:
            raise MediaLoadError(f"{path}: the video has no frames")
        frames = reader.get_batch(idx).asnumpy()           # [T, H, W, 3] uint8
    except MediaLoadError:
        raise
    except Exception as err:  # noqa: BLE001
        raise MediaLoadError(f"{path}: {type(err).__name__}: {err}") from None
    return [Image.fromarray(f) for f in frames]


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's RandomResizedCrop draws it: up to 10 tries at an
    area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else a centre crop
    at the nearest allowed ratio."""
    area = width * height
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(log_lo, log_hi)))
        w = int(round((target * aspect) ** 0.5))
        h = int(round((target / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] with CLIP's mean/std."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


class ClipTransform:
    """CLIP preprocessing. train: random resized crop (bicubic) + horizontal flip; test:
    resize to image_size x image_size (bicubic). Several frames share one crop and flip."""

    def __init__(self, cfg: DataConfig, train: bool):
        self.cfg, self.train = cfg, train

    def __call__(self, frames: list[Image.Image], rng: random.Random | None = None) -> torch.Tensor:
        size = (self.cfg.image_size, self.cfg.image_size)
        box, flip = None, False
        if self.train:
            if rng is None:
                raise ValueError("training transforms need the sample's rng")
            w, h = frames[0].size
            left, top, cw, ch = random_resized_crop_box(w, h, self.cfg.crop_scale, self.cfg.crop_ratio, rng)
            box = (left, top, left + cw, top + ch)
            flip = self.cfg.hflip and rng.random() < 0.5
        out = []
        for frame in frames:
            im = frame.resize(size, Image.Resampling.BICUBIC, box=box)
            if flip:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(to_normalized_tensor(im))
        return torch.stack(out)                                   # [T, 3, S, S]


def load_video_features(path: str) -> torch.Tensor:
    """A per-video feature array [T, d] (.npy, no pickles) -> float32 tensor."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.floating):
            raise MediaLoadError(f"{path}: expected a float array [frames, d], got {arr.dtype} {arr.shape}")
        return torch.from_numpy(np.array(arr, dtype=np.float32))
    except MediaLoadError:
        raise
    except Exception as err:  # noqa: BLE001
        raise MediaLoadError(f"{path}: {type(err).__name__}: {err}") from None


def load_visual(item: ItemRecord, cfg: DataConfig, transform: ClipTransform,
                rng: random.Random | None = None) -> torch.Tensor:
    """Image -> [3, S, S]; video -> [T, 3, S, S]; video features -> [T, d]."""
    if item.features is not None:
        return load_video_features(item.features)
    path = resolve_media(item.root, item.relpath)
    if item.media_type == "video":
        return transform(load_video_frames(path, cfg.video_frames), rng)
    return transform([load_image(path)], rng)[0]


def collate_visual(visuals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images stack to [B, 3, S, S]; videos pad to [B, T, 3, S, S] (features: [B, T, d]) with a
    frame mask [B, T]."""
    if visuals[0].dim() == 3:
        return torch.stack(visuals), None
    T = max(v.shape[0] for v in visuals)
    out = visuals[0].new_zeros(len(visuals), T, *visuals[0].shape[1:])
    mask = torch.zeros(len(visuals), T, dtype=torch.bool)
    for b, v in enumerate(visuals):
        out[b, :v.shape[0]] = v
        mask[b, :v.shape[0]] = True
    return out, mask


# ---------------------------------------------------------------------------- description cache

class DescFeatureCache:
    """Token features of every item's descriptions from a *frozen* text encoder, on disk.

    Layout: ``feats.npy`` float16 [total tokens, w] (memory-mapped by readers), ``index.npy``
    int64 [n_items, n_views, 2] (start, length; length 0 = missing view). Only for
    ``cache_desc_features`` runs, whose description encoder is the pretrained text encoder,
    frozen (evaluation then encodes with the same frozen encoder).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._feats = None
        self.index = np.load(self.folder / "index.npy")

    @property
    def feats(self) -> np.ndarray:
        if self._feats is None:   # opened lazily: each DataLoader worker maps its own view
            self._feats = np.load(self.folder / "feats.npy", mmap_mode="r")
        return self._feats

    def __getstate__(self):
        return {"folder": self.folder, "index": self.index, "_feats": None}

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / "index.npy").is_file() and (Path(folder) / "feats.npy").is_file()

    def item(self, i: int) -> list[torch.Tensor]:
        """Per view: float32 [L_v, w] (L_v = 0 for a missing view)."""
        out = []
        for start, length in self.index[i]:
            out.append(torch.from_numpy(np.asarray(self.feats[start:start + length], dtype=np.float32)))
        return out

    @classmethod
    @torch.no_grad()
    def build(cls, folder: Path, text_encoder: torch.nn.Module, tokenizer, items: Sequence[ItemRecord],
              cfg: DataConfig, batch_size: int = 64, device: str = "cpu") -> "DescFeatureCache":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        text_encoder = text_encoder.to(device).eval()
        seqs = [encode_descriptions(tokenizer, it.descriptions, cfg) for it in items]
        flat = [(i, v, s) for i, views in enumerate(seqs) for v, s in enumerate(views) if s]
        width = text_encoder.config.hidden_size
        total = sum(len(s) for _, _, s in flat)
        tmp_feats = folder / f".feats.{os.getpid()}.npy"
        feats = np.lib.format.open_memmap(tmp_feats, mode="w+", dtype=np.float16, shape=(total, width))
        index = np.zeros((len(items), len(cfg.views), 2), dtype=np.int64)
        pos = 0
        for a in range(0, len(flat), batch_size):
            chunk = flat[a:a + batch_size]
            ids, mask = pad([s for _, _, s in chunk])
            hidden = text_encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            hidden = hidden.float().cpu().numpy()
            for (i, v, s), h in zip(chunk, hidden):
                feats[pos:pos + len(s)] = h[:len(s)]
                index[i, v] = (pos, len(s))
                pos += len(s)
        feats.flush()
        del feats
        os.replace(tmp_feats, folder / "feats.npy")
        tmp_index = folder / f".index.{os.getpid()}.npy"
        np.save(tmp_index, index)
        os.replace(tmp_index, folder / "index.npy")
        return cls(folder)


def pad_feature_views(per_item: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Items' per-view feature lists [L_v, w] -> feats [B, (V,) L, w], mask [B, (V,) L]."""
    B, V = len(per_item), len(per_item[0])
    w = per_item[0][0].shape[-1]                               # missing views are [0, w]
    L = max(1, max(f.shape[0] for views in per_item for f in views))
    feats = torch.zeros(B, V, L, w)
    mask = torch.zeros(B, V, L, dtype=torch.long)
    for b, views in enumerate(per_item):
        for v, f in enumerate(views):
            feats[b, v, :f.shape[0]] = f
            mask[b, v, :f.shape[0]] = 1
    if V == 1:
        return feats[:, 0], mask[:, 0]
    return feats, mask


# ---------------------------------------------------------------------------- datasets

def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    # str seeds hash with SHA-512: the same stream in every process, whatever PYTHONHASHSEED
    return random.Random(f"{seed}:{epoch}:{index}")


def _descriptions_row(row: dict, item_index: int, item: ItemRecord, views: Sequence[int], tokenizer,
                      cfg: DataConfig, desc_cache: DescFeatureCache | None) -> None:
    """Put the chosen views' description tokens (or cached features) into a dataset row."""
    if not cfg.views:
        return                                    # no description input (ablated)
    if desc_cache is not None:
        feats = desc_cache.item(item_index)
        row["desc_feats"] = [feats[v] for v in views]
    else:
        row["desc"] = encode_descriptions(tokenizer, [item.descriptions[v] for v in views], cfg)


def _collate_descriptions(batch: dict, rows: list[dict]) -> None:
    if "desc_feats" in rows[0]:
        batch["desc_feats"], batch["desc_mask"] = pad_feature_views([r["desc_feats"] for r in rows])
    elif "desc" in rows[0]:
        batch["desc_ids"], batch["desc_mask"] = pad_views([r["desc"] for r in rows])


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, pair index): one (item, English caption, translation) row."""

    def __init__(self, items: list[ItemRecord], pairs: list[PairRecord], tokenizer, cfg: DataConfig, seed: int,
                 desc_cache: DescFeatureCache | None = None):
        self.items, self.pairs, self.tokenizer, self.cfg, self.seed = items, pairs, tokenizer, cfg, seed
        self.transform = ClipTransform(cfg, train=True)
        self.desc_cache = desc_cache

    def __len__(self) -> int:
        return len(self.pairs)

    def views_for(self, epoch: int, index: int, item: ItemRecord) -> list[int]:
        """The view indices fed for this sample: all, or one drawn from the non-missing ones."""
        every = list(range(len(self.cfg.views)))
        if self.cfg.view_sampling == "all" or len(every) <= 1:
            return every
        present = [v for v in every if item.descriptions[v] is not None] or [0]
        # its own stream: the augmentation draws stay those of view_sampling="all"
        return [random.Random(f"{self.seed}:{epoch}:{index}:view").choice(present)]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        pair = self.pairs[index]
        item = self.items[pair.item]
        rng = sample_rng(self.seed, epoch, index)
        row = {"visual": load_visual(item, self.cfg, self.transform, rng), "item": pair.item,
               "src": encode_caption(self.tokenizer, pair.src, self.cfg),
               "tgt": encode_caption(self.tokenizer, pair.tgt, self.cfg)}
        _descriptions_row(row, pair.item, item, self.views_for(epoch, index, item), self.tokenizer, self.cfg,
                          self.desc_cache)
        return row


def collate_train(rows: list[dict]) -> dict:
    visual, vmask = collate_visual([r["visual"] for r in rows])
    src_ids, src_mask = pad([r["src"] for r in rows])
    tgt_ids, tgt_mask = pad([r["tgt"] for r in rows])
    batch = {"visual": visual, "visual_mask": vmask, "src_ids": src_ids, "src_mask": src_mask,
             "tgt_ids": tgt_ids, "tgt_mask": tgt_mask, "ids": torch.tensor([r["item"] for r in rows])}
    _collate_descriptions(batch, rows)
    return batch


class ItemDataset(torch.utils.data.Dataset):
    """Evaluation items: test-time preprocessing and descriptions."""

    def __init__(self, items: list[ItemRecord], tokenizer, cfg: DataConfig,
                 desc_cache: DescFeatureCache | None = None):
        self.items, self.tokenizer, self.cfg, self.desc_cache = items, tokenizer, cfg, desc_cache
        self.transform = ClipTransform(cfg, train=False)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        row = {"visual": load_visual(item, self.cfg, self.transform)}
        _descriptions_row(row, i, item, range(len(self.cfg.views)), self.tokenizer, self.cfg, self.desc_cache)
        return row


def collate_items(rows: list[dict]) -> dict:
    visual, vmask = collate_visual([r["visual"] for r in rows])
    batch = {"visual": visual, "visual_mask": vmask}
    _collate_descriptions(batch, rows)
    return batch


class CaptionDataset(torch.utils.data.Dataset):
    def __init__(self, captions: list[CaptionRecord], tokenizer, cfg: DataConfig):
        self.captions, self.tokenizer, self.cfg = captions, tokenizer, cfg

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> list[int]:
        return encode_caption(self.tokenizer, self.captions[i].text, self.cfg)


def collate_captions(rows: list[list[int]]) -> dict:
    ids, mask = pad(rows)
    return {"ids": ids, "mask": mask}


# ---------------------------------------------------------------------------- batches

@dataclass
class EpochBatches:
    """The global batches of one epoch: a permutation from (seed, epoch), cut into
    ``global_batch`` rows (last partial batch dropped: gathered losses need equal shards);
    rank r takes rows [r * B/W, (r + 1) * B/W) of every global batch, so the gathered batch is
    the one-process batch in the same order. ``start`` skips batches already done (resume)."""
    n: int
    global_batch: int
    seed: int
    epoch: int
    rank: int = 0
    world: int = 1
    start: int = 0
    order: list[int] = field(init=False)

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.world} ranks")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.order = torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return max(0, self.n // self.global_batch - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per = self.global_batch // self.world
        for b in range(self.start, self.n // self.global_batch):
            rows = self.order[b * self.global_batch + self.rank * per: b * self.global_batch + (self.rank + 1) * per]
            yield [(self.epoch, i) for i in rows]


def batches_per_epoch(n: int, global_batch: int) -> int:
    return n // global_batch


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: creating an iterator then never draws from (and so never
    moves) the global torch RNG, which dropout uses; resumed runs stay bit-identical."""
    return torch.Generator().manual_seed(seed)
