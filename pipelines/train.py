"""The train stage: one LECCR model per target language, from the working folder.

Inputs (all validated against schemas/): WORKDIR/manifest (items, splits from the `split`
column), WORKDIR/captions (English human captions of the train split paired with their
machine translations into --lang via `source_caption_id`; human --lang captions of the
validation split), WORKDIR/descriptions (one row per (item, view); the views to use are a
config choice). Training rows are (item, English caption, its translation); validation picks
the checkpoint with the best R@sum.

One process needs no launcher (`leccr_core.train.train` in this process). With `workers > 1`
or a Ray address it runs on Ray Train (TorchTrainer: one DDP rank per worker, gloo on CPU,
NCCL on GPUs); the driver follows the ranks through train.jsonl for its progress bar.

Outputs: WORKDIR/checkpoints/<run>/{last,best}.pt, WORKDIR/logs/train-<run>/{train.jsonl,
summary.json, tensorboard/}. An existing run is resumed only when asked (`resume`), or
replaced (`overwrite`); otherwise the stage refuses to touch it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemas
from pipelines import store

# Describe-stage error kinds that mean the media itself could not be read (pipelines/media.py):
# such an item is skipped; other description errors (engine failures) leave the item with an
# empty description.
MEDIA_ERROR_KINDS = frozenset({
    "empty_file", "too_large", "unreadable_image", "decompression_bomb", "bad_aspect_ratio", "unreadable_video",
    "no_video_stream", "empty_video", "outside_root", "not_found", "unsupported_type", "load_failed"})
DEFAULT_VIEW = "detailed"


@dataclass
class TrainStageConfig:
    workdir: Path
    lang: str                                   # target language (BCP-47, as the captions spell it)
    preset: str | None = None                   # leccr_core.config.preset_names(): <bench> or release-<bench>
    model: dict[str, Any] = field(default_factory=dict)   # LeccrConfig overrides (vision_model, d, w_dstl, ...)
    # leccr_core.train.TrainConfig, used as given; or a dict of TrainConfig fields set explicitly,
    # laid over the preset's train side (epochs; the release's lr multiplier, clipping, precision)
    train: Any = None
    ablate: tuple[str, ...] = ()                # leccr_core.config.ABLATIONS names (recorded in the model config)
    views: tuple[str, ...] | None = None        # description views; None: "detailed" if present, else the first
    view_sampling: str = "all"                  # all | random (one view per item per step in training)
    video_features: Path | None = None          # per-video feature arrays (.npy or Parquet), by native video id
    source_lang: str = "en"
    train_split: str = "train"
    val_split: str | None = "val"               # None: no validation (last.pt only, no best.pt)
    media: str | None = None                    # image | video; None: what the manifest holds
    video_frames: int = 8
    caption_max_tokens: int = 64
    drop_mt_flags: tuple[str, ...] = ()         # drop translations carrying any of these quality flags
    run_name: str | None = None                 # default: the language
    resume: bool = False
    overwrite: bool = False
    workers: int = 1                            # >1: Ray Train with this many DDP ranks
    use_gpu: bool | None = None                 # Ray Train: None = when the cluster has GPUs
    cpus_per_worker: float = 1.0
    ray_address: str | None = None
    progress: bool = True

    @property
    def run(self) -> str:
        return self.run_name or self.lang


@dataclass
class TrainData:
    """The working folder turned into records (leccr_core.data)."""
    media: str
    views: tuple[str, ...]
    items: list                                  # ItemRecord, train split
    pairs: list                                  # PairRecord
    val: Any                                     # EvalSet | None
    counts: Counter = field(default_factory=Counter)
    fingerprints: dict[str, list[str]] = field(default_factory=dict)   # view -> description fingerprints used
    notes: list[str] = field(default_factory=list)                     # choices made for the user, to print


@dataclass
class TrainReport:
    run: str
    lang: str
    media: str
    views: tuple[str, ...]
    train_items: int
    train_rows: int
    val_items: int
    val_captions: int
    skipped: dict[str, int]
    summary: dict[str, Any]
    run_dir: str
    log_dir: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- reading the workdir

CAPTION_COLUMNS = ["caption_id", "item_id", "split", "lang", "text", "origin", "source_caption_id", "quality_flags",
                   "created_at", "error_kind"]
DESCRIPTION_COLUMNS = ["item_id", "view", "text", "fingerprint", "created_at", "error_kind"]


def _read(folder: Path, schema, stage_hint: str, what: str, columns: list[str] | None = None):
    if not store.parquet_files(folder):
        raise store.StageInputError(f"no {what} in {folder}: {stage_hint}")
    try:
        return store.read_folder(folder, schema, columns=columns).to_pylist()
    except schemas.SchemaError as err:
        raise store.StageInputError(f"{what}: {err}") from None


def _same_lang(a: str | None, b: str) -> bool:
    return a is not None and a.lower() == b.lower()


def read_workdir(workdir: Path, need_descriptions: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """Manifest, captions and descriptions rows. Without ``need_descriptions`` (a model with no
    description input) a missing descriptions folder is no error."""
    manifest = _read(workdir / store.MANIFEST_DIR, schemas.MANIFEST,
                     "run `leccr-pipe ingest` (or `describe --input`) first", "manifest")
    captions = _read(workdir / store.CAPTIONS_DIR, schemas.CAPTIONS, "run `leccr-pipe ingest` first", "captions",
                     CAPTION_COLUMNS)
    descriptions = []
    if need_descriptions or store.parquet_files(workdir / store.DESCRIPTIONS_DIR):
        descriptions = _read(workdir / store.DESCRIPTIONS_DIR, schemas.DESCRIPTIONS,
                             "run `leccr-pipe describe` first", "descriptions", DESCRIPTION_COLUMNS)
    return manifest, captions, descriptions


# --------------------------------------------------------------------------- video features

FEATURE_INDEX = "index.json"          # {native video id: file name} in a features folder (optional for .npy)


def video_feature_index(folder: Path) -> dict[str, Path]:
    """Native video id -> [T, d] .npy file of a resolved features folder: its index.json, else
    every ``<video id>.npy`` in it."""
    folder = Path(folder)
    if (folder / FEATURE_INDEX).is_file():
        names = json.loads((folder / FEATURE_INDEX).read_text(encoding="utf-8"))
        return {vid: folder / name for vid, name in names.items()}
    return {p.stem: p for p in sorted(folder.glob("*.npy")) if not p.name.startswith(".")}


def _parquet_feature_columns(schema, where: Path) -> tuple[str, str]:
    import pyarrow as pa
    ids = [n for n in ("video_id", "id") if n in schema.names]
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
             or pa.types.is_fixed_size_list(f.type)]
    feats = ["features"] if "features" in lists else lists
    if not ids or len(feats) != 1:
        raise store.StageInputError(f"{where}: a video features Parquet needs a string column video_id (or id) and "
                                    f"one list column of frames (features: list<list<float>>); columns: "
                                    f"{', '.join(schema.names)}")
    return ids[0], feats[0]


def resolve_video_features(folder: Path, workdir: Path) -> Path:
    """A folder of per-video features -> a folder of [T, d] .npy files (video_feature_index).

    ``<video id>.npy`` files are used where they lie. Parquet files (a video_id column and a
    list column holding the frames, list<list<float>> [T][d]) are unpacked once into
    WORKDIR/cache/video-features-<hash of the files' names, sizes and times>/."""
    import numpy as np
    import pyarrow.parquet as pq
    folder = Path(folder)
    if not folder.is_dir():
        raise store.StageInputError(f"--video-features {folder}: no such folder")
    parquets = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))
    if not parquets:
        if not video_feature_index(folder):
            raise store.StageInputError(f"--video-features {folder}: no <video id>.npy or .parquet files")
        return folder
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in parquets]
    out = workdir / "cache" / f"video-features-{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}"
    if (out / FEATURE_INDEX).is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names: dict[str, str] = {}
    for path in parquets:
        id_col, feat_col = _parquet_feature_columns(pq.read_schema(path), path)
        table = pq.read_table(path, columns=[id_col, feat_col])
        for vid, frames in zip(table.column(id_col).to_pylist(), table.column(feat_col).to_pylist()):
            try:
                arr = np.asarray(frames, dtype=np.float32)
            except (TypeError, ValueError):
                raise store.StageInputError(f"{path}: video {vid!r}: frames of unequal width") from None
            if arr.ndim != 2 or arr.shape[0] < 1:
                raise store.StageInputError(f"{path}: video {vid!r}: expected [frames, d], got shape {arr.shape}")
            if vid in names:
                raise store.StageInputError(f"{path}: video {vid!r} appears twice in {folder}")
            names[str(vid)] = f"{len(names):08d}.npy"
            np.save(tmp / names[str(vid)], arr, allow_pickle=False)
    (tmp / FEATURE_INDEX).write_text(json.dumps(names), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def feature_width(index: dict[str, Path]) -> int:
    import numpy as np
    first = next(iter(index.values()))
    arr = np.load(first, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 2:
        raise store.StageInputError(f"{first}: expected a [frames, d] array, got shape {arr.shape}")
    return int(arr.shape[1])


def choose_views(descriptions: list[dict], wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    available = sorted({r["view"] for r in descriptions if r["error_kind"] is None and r["text"] is not None})
    if not available:
        raise store.StageInputError("every description row is an error row: nothing to train on")
    if wanted:
        unknown = [v for v in wanted if v not in available]
        if unknown:
            raise store.StageInputError(f"description view(s) {', '.join(unknown)} not in the workdir; "
                                        f"available: {', '.join(available)}")
        return tuple(wanted)
    return (DEFAULT_VIEW,) if DEFAULT_VIEW in available else (available[0],)


def _latest_descriptions(descriptions: list[dict], views: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """(item, view) -> text of the newest good row; item -> set of error kinds; view -> fingerprints."""
    best: dict[tuple[str, str], dict] = {}
    errors: dict[str, set] = {}
    for r in descriptions:
        if r["view"] not in views:
            continue
        if r["error_kind"] is not None or r["text"] is None:
            errors.setdefault(r["item_id"], set()).add(r["error_kind"] or "no_text")
            continue
        key = (r["item_id"], r["view"])
        old = best.get(key)
        stamp = r["created_at"].timestamp() if r["created_at"] is not None else 0.0
        newer = old is None or stamp > old["_t"]
        if newer or (stamp == old["_t"] and (r["fingerprint"] or "") > (old["fingerprint"] or "")):
            best[key] = {**r, "_t": stamp}
    prints: dict[str, set] = {}
    for (_, view), r in best.items():
        prints.setdefault(view, set()).add(r["fingerprint"] or "")
    return ({k: v["text"] for k, v in best.items()}, errors,
            {v: sorted(p) for v, p in prints.items()})


def usable_items(manifest: list[dict], descriptions: list[dict], views: tuple[str, ...], media: str | None,
                 counts: Counter, features: dict[str, Path] | None = None,
                 notes: list[str] | None = None) -> tuple[dict[str, Any], str, dict]:
    """item_id -> ItemRecord for every item whose media can be used; counts what is skipped.
    With ``features`` (native video id -> .npy), video items are matched to their features by
    the manifest's source_id: the video files themselves are not needed (nor read). Without a
    ``media`` choice a mixed manifest gives its images (and a line in ``notes``)."""
    from leccr_core.data import ItemRecord
    texts, desc_errors, prints = _latest_descriptions(descriptions, views)
    rows = []
    for r in manifest:
        if features is not None and r["media_type"] == "video":
            if r["source_id"] not in features:
                counts["no_video_features"] += 1
                continue
            rows.append(r)
            continue
        if r["error_kind"] is not None or r["relpath"] is None:
            counts[f"manifest_error:{r['error_kind'] or 'no_path'}"] += 1
            continue
        rows.append(r)
    kinds = Counter(r["media_type"] for r in rows)
    if media is None:
        known = {k for k in kinds if k in ("image", "video")}
        if len(known) > 1 and notes is not None:
            # one model is for one kind of media: the images by default, said out loud
            notes.append(f"the manifest mixes images ({kinds['image']}) and videos ({kinds['video']}): training on "
                         "the images; --media video trains on the videos")
        media = "image" if "image" in known or not known else "video"
    items = {}
    for r in rows:
        if r["media_type"] != media:
            counts[f"other_media:{r['media_type']}"] += 1
            continue
        per_view = tuple(texts.get((r["item_id"], v)) for v in views)
        feats = str(features[r["source_id"]]) if features is not None and media == "video" else None
        if views and all(t is None for t in per_view):
            if feats is None and desc_errors.get(r["item_id"], set()) & MEDIA_ERROR_KINDS:
                counts["media_unreadable_in_describe"] += 1
                continue
            counts["items_without_description"] += 1
        elif any(t is None for t in per_view):
            counts["items_missing_a_view"] += 1
        items[r["item_id"]] = (ItemRecord(r["item_id"], media, r["root"], r["relpath"] or "", per_view, feats),
                               r["split"])
    _check_media_are_local(items)
    return items, media, prints


def _check_media_are_local(items: dict) -> None:
    """Training reads every image again each epoch, from local files: media that describe read
    from object storage (roots as URIs in the manifest) are refused up front, with the way out."""
    from pipelines.storage import is_remote
    remote = sorted({rec.root for rec, _ in items.values() if rec.features is None and is_remote(rec.root)})
    if remote:
        n = sum(1 for rec, _ in items.values() if rec.root in remote)
        raise store.StageInputError(
            f"{n} items have their media in object storage ({', '.join(remote[:3])}); train, evaluate and index read "
            f"media from local files. Copy them down (e.g. `aws s3 sync {remote[0]} /data/media`) and ingest the copy "
            f"into this workdir with the same --dataset: the item ids stay the same, so the descriptions and "
            f"translations still apply")


def build_eval_set(items: dict, captions: list[dict], split: str, lang: str, name: str | None = None):
    """Items of `split` with their human `lang` captions (items without one are left out)."""
    from leccr_core.data import CaptionRecord, EvalSet
    chosen = sorted(i for i, (_, s) in items.items() if s == split)
    caps = sorted((c for c in captions if c["origin"] == "human" and _same_lang(c["lang"], lang)
                   and c["item_id"] in items and items[c["item_id"]][1] == split and c["text"]),
                  key=lambda c: c["caption_id"])
    with_caption = sorted({c["item_id"] for c in caps})
    index = {item_id: k for k, item_id in enumerate(with_caption)}
    evalset = EvalSet(items=[items[i][0] for i in with_caption],
                      captions=[CaptionRecord(c["caption_id"], index[c["item_id"]], c["text"]) for c in caps],
                      name=name or split)
    return evalset, len(chosen)


def _splits(items: dict) -> str:
    found = Counter(s for _, s in items.values())
    return ", ".join(f"{s!r} ({n})" for s, n in sorted(found.items(), key=lambda kv: str(kv[0]))) or "none"


def _ablations(cfg: TrainStageConfig) -> set[str]:
    return set(cfg.ablate) | set(cfg.model.get("ablate") or ())


def needs_descriptions(cfg: TrainStageConfig) -> bool:
    """False when an ablation removes the description input (slots, descriptions)."""
    return not (_ablations(cfg) & {"slots", "descriptions"})


def load_train_data(cfg: TrainStageConfig, features: dict[str, Path] | None = None) -> TrainData:
    from leccr_core.data import PairRecord
    need = needs_descriptions(cfg)
    manifest, captions, descriptions = read_workdir(cfg.workdir, need)
    counts: Counter = Counter()
    views = choose_views(descriptions, cfg.views) if need else ()
    if features is not None and cfg.media not in (None, "video"):
        raise store.StageInputError("--video-features is for videos; the media given is " + str(cfg.media))
    notes: list[str] = []
    items, media, prints = usable_items(manifest, descriptions, views, "video" if features is not None else cfg.media,
                                        counts, features, notes)

    train_ids = sorted(i for i, (_, s) in items.items() if s == cfg.train_split)
    if not train_ids:
        raise store.StageInputError(f"the train split {cfg.train_split!r} has no usable {media} items; "
                                    f"splits in the manifest: {_splits(items)}")
    index = {item_id: k for k, item_id in enumerate(train_ids)}
    sources = {c["caption_id"]: c for c in captions
               if c["origin"] == "human" and _same_lang(c["lang"], cfg.source_lang) and c["item_id"] in index
               and c["text"]}
    if not sources:
        raise store.StageInputError(f"no human {cfg.source_lang!r} captions for the {cfg.train_split!r} items")
    mt = [c for c in captions if c["origin"] == "mt" and _same_lang(c["lang"], cfg.lang)]
    if not mt:
        raise store.StageInputError(f"no machine-translated {cfg.lang!r} captions in "
                                    f"{cfg.workdir / store.CAPTIONS_DIR}: "
                                    f"run `leccr-pipe translate --workdir {cfg.workdir} --to {cfg.lang}` first")
    newest: dict[str, dict] = {}
    for c in mt:
        if c["error_kind"] is not None or not (c["text"] or "").strip():
            counts["mt_error_or_empty"] += 1
            continue
        if set(c["quality_flags"] or ()) & set(cfg.drop_mt_flags):
            counts["mt_dropped_by_flag"] += 1
            continue
        src = c["source_caption_id"]
        if src not in sources:
            counts["mt_without_train_source"] += 1
            continue
        old = newest.get(src)
        stamp = c["created_at"].timestamp() if c["created_at"] is not None else 0.0
        if old is not None:
            counts["mt_older_duplicates"] += 1
        if old is None or stamp > old["_t"]:
            newest[src] = {**c, "_t": stamp}
    untranslated = len(set(sources) - set(newest))
    if untranslated:
        counts["english_without_translation"] += untranslated
    pairs = [PairRecord(index[sources[s]["item_id"]], sources[s]["text"], newest[s]["text"]) for s in sorted(newest)]
    if not pairs:
        raise store.StageInputError(f"no (English caption, {cfg.lang} translation) pairs for the "
                                    f"{cfg.train_split!r} split: every translation is an error, flagged or unmatched")
    val = None
    if cfg.val_split:
        val, n_val_items = build_eval_set(items, captions, cfg.val_split, cfg.lang)
        if not val.captions:
            raise store.StageInputError(
                f"the validation split {cfg.val_split!r} has {n_val_items} usable items and no human {cfg.lang!r} "
                f"captions (splits in the manifest: {_splits(items)}); name another with --val-split, or train "
                "without model selection: --val-split none")
    return TrainData(media=media, views=views, items=[items[i][0] for i in train_ids], pairs=pairs, val=val,
                     counts=counts, fingerprints=prints, notes=notes)


# --------------------------------------------------------------------------- configs

def _preset(cfg: TrainStageConfig) -> tuple[dict, dict]:
    from leccr_core.config import resolve_preset
    if not cfg.preset:
        return {}, {}
    try:
        return resolve_preset(cfg.preset)
    except KeyError as err:
        raise store.StageInputError(str(err).strip("'\"")) from None


def train_config(cfg: TrainStageConfig):
    """TrainConfig: as given, or defaults <- the preset's train side <- the explicit options."""
    from leccr_core.train import TrainConfig
    if isinstance(cfg.train, TrainConfig):
        return cfg.train
    try:
        return TrainConfig(**{**_preset(cfg)[1], **(cfg.train or {})})
    except (TypeError, ValueError) as err:
        raise store.StageInputError(f"train config: {err}") from None


def model_config(cfg: TrainStageConfig, media: str, feature_dim: int | None = None):
    """Preset + overrides; the visual and text widths come from the encoders' own configs
    (or the video features) unless given (a tiny or another-size encoder then needs no extra
    flags)."""
    from leccr_core.config import LeccrConfig
    preset_model = _preset(cfg)[0]
    base = dict(LeccrConfig(**preset_model).to_dict()) if cfg.preset else {}
    explicit = dict(cfg.model)
    if cfg.ablate:
        explicit["ablate"] = sorted(_ablations(cfg))
    if cfg.preset and base["media"] != media:
        raise store.StageInputError(f"preset {cfg.preset} is for {base['media']}, the data are {media}")
    if feature_dim is not None:
        explicit["video_input"] = "features"
        explicit.setdefault("d", feature_dim)
        if explicit["d"] != feature_dim:
            raise store.StageInputError(f"d={explicit['d']} but the video features are {feature_dim}-d")
    merged = {**base, **explicit, "media": media}
    vision_needed = not (media == "video" and merged.get("video_input", "clip_frames") == "features")
    check_encoder(merged.get("text_model", LeccrConfig.text_model), "--text-model", "bert")
    if vision_needed:
        check_encoder(merged.get("vision_model", LeccrConfig.vision_model), "--vision-model", "clip")
    try:
        from transformers import AutoConfig
        if "text_width" not in explicit:
            text_model = merged.get("text_model", LeccrConfig.text_model)
            merged["text_width"] = AutoConfig.from_pretrained(text_model).hidden_size
        if "d" not in explicit and vision_needed:
            vision_model = merged.get("vision_model", LeccrConfig.vision_model)
            vc = AutoConfig.from_pretrained(vision_model)
            merged["d"] = vc.projection_dim
    except OSError as err:
        raise store.StageInputError(f"cannot read an encoder config: {err}") from None
    try:
        return LeccrConfig(**merged)
    except (TypeError, ValueError) as err:
        raise store.StageInputError(f"model config: {err}") from None


def check_encoder(name: str, flag: str, tiny_family: str) -> None:
    """An encoder must be a local folder, a hub id in the Hugging Face cache, or a hub id the hub
    answers for now (pipelines.hub). Anything else fails at once (StageInputError) naming the
    flag, instead of transformers retrying an unreachable hub for half a minute before failing."""
    from pipelines.hub import unavailable
    reason = unavailable(name)
    if reason:
        raise store.StageInputError(f"{flag} {name}: {reason}; download it where the hub is reachable, or point "
                                    f"{flag} at a local folder (a tiny offline one: `leccr-pipe make-tiny-model "
                                    f"--family {tiny_family} --out DIR`)")


def data_config(cfg: TrainStageConfig, mc, views: tuple[str, ...], video_features: Path | None = None):
    from leccr_core.data import DataConfig
    try:
        return DataConfig(views=views, view_sampling=cfg.view_sampling, caption_max_words=mc.caption_max_words,
                          caption_max_tokens=cfg.caption_max_tokens, desc_max_tokens=mc.desc_max_tokens,
                          image_size=mc.image_size, video_frames=cfg.video_frames,
                          video_features=str(video_features) if video_features else None)
    except ValueError as err:
        raise store.StageInputError(f"data config: {err}") from None


def _check_resume(last: Path, mc, dc, tc) -> None:
    from leccr_core.checkpoint import CheckpointError, load_checkpoint
    from leccr_core.train import RESUME_FIELDS
    try:
        ckpt = load_checkpoint(last)
    except CheckpointError as err:
        raise store.StageInputError(str(err)) from None
    diffs = [f"model.{k}" for k, v in mc.to_dict().items() if ckpt["model_config"].get(k) != v]
    diffs += [f"data.{k}" for k, v in json.loads(json.dumps(dc.to_dict())).items()
              if json.loads(json.dumps(ckpt["data_config"].get(k))) != v]
    saved_train = json.loads(json.dumps(ckpt["train_config"]))
    now_train = json.loads(json.dumps(tc.to_dict()))
    diffs += [f"train.{k}" for k in RESUME_FIELDS if saved_train.get(k) != now_train.get(k)]
    if diffs:
        raise store.StageInputError(f"cannot resume {last}: the run's settings changed ({', '.join(diffs)}); "
                                    "use the same settings, or --overwrite to start again")


def _cache_dirs(cfg: TrainStageConfig, data: TrainData, mc, dc) -> dict[str, Path]:
    """Build (once) the description-feature caches of the train and val items."""
    import torch
    from transformers import AutoModel

    from leccr_core.data import DescFeatureCache
    from leccr_core.model import load_tokenizer
    text = AutoModel.from_pretrained(mc.text_model)
    tokenizer = load_tokenizer(mc)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, items in (("train", data.items), ("val", data.val.items if data.val else [])):
        if not items:
            continue
        h = hashlib.sha256(json.dumps([mc.text_model, dc.to_dict(), [(i.item_id, i.descriptions) for i in items]],
                                      sort_keys=True, default=str).encode()).hexdigest()[:20]
        folder = cfg.workdir / "cache" / f"desc-{h}"
        if not DescFeatureCache.exists(folder):
            DescFeatureCache.build(folder, text, tokenizer, items, dc, device=device)
        out[name] = folder
    return out


# --------------------------------------------------------------------------- run

@dataclass
class PreparedRun:
    """Everything a run needs, read and checked, before any training (and before the lock)."""
    job: Any                                     # leccr_core.train.TrainJob
    data: TrainData


def prepare(cfg: TrainStageConfig) -> PreparedRun:
    """Workdir -> a TrainJob (configs resolved and validated; nothing written)."""
    from leccr_core.train import TrainJob
    tc = train_config(cfg)
    if cfg.workers < 1:
        raise store.StageInputError("--workers must be at least 1")
    if tc.batch_size % cfg.workers:
        raise store.StageInputError(f"--batch-size {tc.batch_size} is not divisible by {cfg.workers} workers")
    features_dir = index = None
    if cfg.video_features is None and {**_preset(cfg)[0], **cfg.model}.get("video_input") == "features":
        raise store.StageInputError(f"{'preset ' + cfg.preset if cfg.preset else 'video_input=features'} trains on "
                                    "pre-extracted frame features: give them with --video-features DIR")
    if cfg.video_features is not None:
        features_dir = resolve_video_features(Path(cfg.video_features), cfg.workdir)
        index = video_feature_index(features_dir)
    data = load_train_data(cfg, index)
    mc = model_config(cfg, data.media, feature_width(index) if index else None)
    dc = data_config(cfg, mc, data.views, features_dir)
    run_dir = cfg.workdir / "checkpoints" / cfg.run
    log_dir = cfg.workdir / "logs" / f"train-{cfg.run}"
    meta = {"run": cfg.run, "lang": cfg.lang, "source_lang": cfg.source_lang, "train_split": cfg.train_split,
            "val_split": cfg.val_split, "workdir": str(cfg.workdir), "skipped": dict(data.counts),
            "description_fingerprints": data.fingerprints, "preset": cfg.preset, "ablate": list(mc.ablate)}
    job = TrainJob(model_cfg=mc, data_cfg=dc, train_cfg=tc, items=data.items, pairs=data.pairs, val=data.val,
                   run_dir=run_dir, log_dir=log_dir, resume=cfg.resume, meta=meta)
    return PreparedRun(job=job, data=data)


def run(cfg: TrainStageConfig) -> TrainReport:
    prepared = prepare(cfg)
    job, data = prepared.job, prepared.data
    mc, dc, tc, run_dir, log_dir = job.model_cfg, job.data_cfg, job.train_cfg, job.run_dir, job.log_dir
    with store.exclusive(cfg.workdir, f"train-{cfg.run}"):
        last = run_dir / "last.pt"
        if cfg.overwrite:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(log_dir, ignore_errors=True)
        elif last.is_file() and not cfg.resume:
            raise store.StageInputError(f"{run_dir} already holds a run: --resume to continue it, "
                                        "--overwrite to start again")
        elif cfg.resume and last.is_file():
            _check_resume(last, mc, dc, tc)
        log_dir.mkdir(parents=True, exist_ok=True)
        if tc.cache_desc_features and dc.views:
            job.desc_cache = _cache_dirs(cfg, data, mc, dc)
        if cfg.workers > 1 or cfg.ray_address:
            summary = train_with_ray(cfg, [job])[0]
        else:
            summary = _train_here(cfg, job)
    return TrainReport(run=cfg.run, lang=cfg.lang, media=data.media, views=data.views, train_items=len(data.items),
                       train_rows=len(data.pairs), val_items=len(data.val.items) if data.val else 0,
                       val_captions=len(data.val.captions) if data.val else 0, skipped=dict(data.counts),
                       summary=summary, run_dir=str(run_dir), log_dir=str(log_dir), notes=data.notes)


def _steps_total(job) -> int:
    from leccr_core.train import total_steps
    return total_steps(len(job.pairs), job.train_cfg)


def _train_here(cfg: TrainStageConfig, job) -> dict:
    from leccr_core.train import train

    from pipelines.progress import progress_bar
    done = _resume_step(job)
    with progress_bar(f"train {cfg.run}", _steps_total(job), enabled=cfg.progress) as advance:
        advance(done)
        return train(job, on_step=lambda logs: advance(1))


def _resume_step(job) -> int:
    last = job.run_dir / "last.pt"
    if not (job.resume and last.is_file()):
        return 0
    from leccr_core.checkpoint import load_checkpoint
    return int(load_checkpoint(last)["position"]["step"])


def _ray_worker(config: dict) -> None:
    """DDP ranks under Ray Train (torch.distributed is already initialised): the jobs in turn."""
    import ray.train
    import ray.train.torch

    from leccr_core.train import train
    ctx = ray.train.get_context()
    for job in config["jobs"]:
        train(job, rank_=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device())


def train_with_ray(cfg: TrainStageConfig, jobs: list) -> list[dict]:
    """Run the jobs one after another on one Ray Train worker group (cfg.workers DDP ranks:
    one start of the group and its process group for all of them, e.g. an ablation sweep).
    Returns each job's summary."""
    from pipelines.progress import progress_bar
    from pipelines.ray_utils import init_ray, root_cause
    ray = init_ray(cfg.ray_address)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= cfg.workers
    if use_gpu and any(job.train_cfg.device == "cpu" for job in jobs):
        use_gpu = False
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"jobs": jobs},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"train-{cfg.run}-{int(time.time())}", storage_path=str(jobs[0].log_dir / "ray"),
                             failure_config=FailureConfig(max_failures=0)))
    outcome: dict[str, Any] = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as err:  # noqa: BLE001 - reported below with its root cause
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    starts = [_resume_step(job) for job in jobs]
    logs = [job.log_dir / "train.jsonl" for job in jobs]
    total = sum(_steps_total(job) for job in jobs)
    with progress_bar(f"train {cfg.run} ({cfg.workers} workers)", total, enabled=cfg.progress) as advance:
        advance(sum(starts))
        shown = list(starts)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=1.0)
            shown = [_follow(path, n, advance) for path, n in zip(logs, shown)]
        for path, n in zip(logs, shown):
            _follow(path, n, advance)
    if "error" in outcome:
        raise RuntimeError(f"Ray Train failed: {root_cause(outcome['error'])}") from outcome["error"]
    result = outcome.get("result")
    if result is not None and getattr(result, "error", None):
        raise RuntimeError(f"Ray Train failed: {root_cause(result.error)}")
    summaries = []
    for job in jobs:
        path = job.log_dir / "summary.json"
        summaries.append(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})
    return summaries


def _follow(log_path: Path, shown: int, advance) -> int:
    """Advance the bar to the newest step in train.jsonl."""
    if not log_path.is_file():
        return shown
    newest = shown
    try:
        for line in log_path.read_text(encoding="utf-8").splitlines()[-50:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" not in rec:
                newest = max(newest, int(rec.get("step", 0)))
    except OSError:
        return shown
    if newest > shown:
        advance(newest - shown)
    return newest


# --------------------------------------------------------------------------- summary

def print_summary(report: TrainReport) -> None:
    from rich.console import Console
    from rich.table import Table
    s = report.summary
    table = Table(title=f"train {report.run}: summary", show_header=False)
    table.add_row("data", f"{report.media}: {report.train_items} train items, {report.train_rows} caption pairs "
                          f"(en -> {report.lang}); val {report.val_items} items / {report.val_captions} captions; "
                          f"views {', '.join(report.views)}")
    table.add_row("skipped", ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())) or "none")
    for note in report.notes:
        table.add_row("note", note)
    if s.get("ablate"):
        table.add_row("ablated", ", ".join(s["ablate"]) + f" (loss terms: {', '.join(s.get('loss_terms', []))})")
    if s:
        state = "finished" if s.get("finished") else f"stopped at step {s.get('steps')}"
        table.add_row("steps", f"{s.get('steps')} / {s.get('steps_total')} ({state}; resumed from "
                               f"{s.get('resumed_from_step')})" if s.get("resumed_from_step") is not None
                      else f"{s.get('steps')} / {s.get('steps_total')} ({state})")
        table.add_row("devices", f"{s.get('world_size')} x {s.get('device')} ({s.get('precision')})")
        if s.get("first_loss") is not None:
            table.add_row("loss", f"{s['first_loss']:.4f} -> {s['last_loss']:.4f}")
        if s.get("best_val_rsum") is not None:
            m = s.get("best_metrics") or {}
            table.add_row("best val", f"R@sum {s['best_val_rsum']:.2f} at step {s['best_step']} "
                                      f"(t2v R@1 {m.get('t2v_r1', 0):.2f}, v2t R@1 {m.get('v2t_r1', 0):.2f})")
        table.add_row("speed", f"{s.get('samples_per_s', 0):.1f} samples/s, {s.get('wall_s', 0):.1f} s")
        best = f", {s['checkpoint_best']}" if s.get("checkpoint_best") else ""
        table.add_row("checkpoints", f"{s.get('checkpoint_last')}{best}")
        table.add_row("logs", f"{s.get('log_jsonl')}" + (" + tensorboard" if s.get("tensorboard") else ""))
    Console(stderr=True).print(table)
