"""The evaluate stage: a checkpoint against one split's human target-language captions.

Writes WORKDIR/eval/<name>.json (metrics: R@1/5/10, median and mean rank both ways, R@sum,
and what was evaluated) and WORKDIR/eval/<name>-ranks.parquet (one row per query: a caption
for text->visual, an item for visual->text, with its rank). The model, the preprocessing and
the description views come from the checkpoint, so evaluation sees what training saw.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines import store

EVAL_DIR = "eval"
# Per-query ranks. query_id: caption_id (t2v) or item_id (v2t); item_id: the ground-truth item
# (t2v) or the query item itself (v2t); rank: 1-based, ties counted against the model.
RANKS = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("direction", pa.string(), nullable=False),     # t2v | v2t
    pa.field("rank", pa.int64(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
], metadata={b"leccr.schema": b"ranks", b"leccr.schema_version": b"1"})


@dataclass
class EvaluateConfig:
    workdir: Path
    lang: str
    checkpoint: Path | None = None          # default: WORKDIR/checkpoints/<lang>/best.pt, else last.pt
    split: str = "test"
    fusion_weight: float | None = None      # None: the checkpoint's (0 images, 0.1 video by default)
    batch_size: int = 128
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    video_features: Path | None = None      # default: the features folder the checkpoint was trained with
    out_dir: Path | None = None             # default WORKDIR/eval
    name: str | None = None                 # default <lang>-<split>-<checkpoint stem>
    progress: bool = True


@dataclass
class EvaluateReport:
    metrics: dict[str, float]
    lang: str
    split: str
    checkpoint: str
    step: int
    fusion_weight: float
    items: int
    captions: int
    items_in_split: int
    metrics_path: str
    ranks_path: str
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_checkpoint(workdir: Path, run: str) -> Path:
    folder = workdir / "checkpoints" / run
    for name in ("best.pt", "last.pt"):
        if (folder / name).is_file():
            return folder / name
    raise store.StageInputError(f"no checkpoint in {folder}: run `leccr-pipe train --lang {run}` first, "
                                "or pass --checkpoint")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint (weights only); an unreadable one is unusable input (exit 2)."""
    from leccr_core.checkpoint import CheckpointError, load_checkpoint
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise store.StageInputError(str(err)) from None


def load_model(ckpt: dict, device):
    """Rebuild the trained model from a checkpoint (the encoders' configs and tokenizer are
    read from the paths the model config names)."""
    from leccr_core.config import LeccrConfig
    from leccr_core.model import LeccrModel, load_tokenizer
    mc = LeccrConfig.from_dict(ckpt["model_config"])
    try:
        model = LeccrModel.from_pretrained_encoders(mc)
        tokenizer = load_tokenizer(mc)
    except OSError as err:
        raise store.StageInputError(f"cannot load the checkpoint's encoders ({mc.vision_model}, {mc.text_model}): "
                                    f"{err}") from None
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer, mc


def run(cfg: EvaluateConfig) -> EvaluateReport:
    from leccr_core.data import DataConfig
    from leccr_core.evaluate import embed, rank
    from leccr_core.train import autocast_factory, resolve_device, resolve_precision
    from pipelines.train import (build_eval_set, read_workdir, resolve_video_features, usable_items,
                                 video_feature_index)

    started = time.time()
    if cfg.fusion_weight is not None and not 0.0 <= cfg.fusion_weight <= 1.0:
        raise store.StageInputError(f"--fusion-weight {cfg.fusion_weight} is not in [0, 1]")
    path = cfg.checkpoint or default_checkpoint(cfg.workdir, cfg.lang)
    ckpt = read_checkpoint(path)
    dc = DataConfig.from_dict(ckpt["data_config"])
    manifest, captions, descriptions = read_workdir(cfg.workdir, need_descriptions=bool(dc.views))
    counts: Counter = Counter()
    media = ckpt["model_config"]["media"]
    features = None
    if cfg.video_features is not None or dc.video_features:
        folder = resolve_video_features(Path(cfg.video_features or dc.video_features), cfg.workdir)
        features = video_feature_index(folder)
    items, _, _ = usable_items(manifest, descriptions, dc.views, media, counts, features)
    evalset, n_in_split = build_eval_set(items, captions, cfg.split, cfg.lang)
    if not evalset.captions:
        found = sorted({str(s) for _, s in items.values()})
        raise store.StageInputError(f"split {cfg.split!r} has {n_in_split} usable {media} items and no human "
                                    f"{cfg.lang!r} captions (splits: {', '.join(found) or 'none'})")

    device = resolve_device(cfg.device)
    autocast = autocast_factory(resolve_precision(cfg.precision, device), device)
    model, tokenizer, mc = load_model(ckpt, device)
    cache = None
    if ckpt["train_config"].get("cache_desc_features"):
        # trained on a frozen pretrained description encoder: evaluate with the same one
        from transformers import AutoModel

        from leccr_core.data import DescFeatureCache
        cache_dir = (cfg.out_dir or cfg.workdir / EVAL_DIR) / ".desc-cache" / f"{cfg.split}-{os.getpid()}"
        cache = DescFeatureCache.build(cache_dir, AutoModel.from_pretrained(mc.text_model), tokenizer,
                                       evalset.items, dc, device=str(device))
    weight = mc.fusion_weight if cfg.fusion_weight is None else cfg.fusion_weight
    if weight > 0 and not mc.has_local:
        raise store.StageInputError(f"--fusion-weight {weight}: this model's local branch is ablated "
                                    f"({', '.join(mc.ablate)}); it has global scores only")
    try:
        emb = embed(model, evalset, tokenizer, dc, device, cfg.batch_size, cfg.num_workers, autocast, cache)
    finally:
        if cache is not None:
            shutil.rmtree(cache.folder, ignore_errors=True)
    result = rank(emb, weight)

    out_dir = cfg.out_dir or cfg.workdir / EVAL_DIR
    name = cfg.name or f"{cfg.lang}-{cfg.split}-{Path(path).stem}"
    rows = [{"query_id": c.caption_id, "direction": "t2v", "rank": int(r), "item_id": evalset.items[c.item].item_id}
            for c, r in zip(evalset.captions, result.t2v.tolist())]
    rows += [{"query_id": evalset.items[i].item_id, "direction": "v2t", "rank": int(r),
              "item_id": evalset.items[i].item_id} for i, r in zip(result.v2t_items.tolist(), result.v2t.tolist())]
    ranks_path = out_dir / f"{name}-ranks.parquet"
    store.write_atomic(pa.Table.from_pylist(rows, schema=RANKS), ranks_path)
    metrics_path = out_dir / f"{name}.json"
    payload = {"metrics": result.metrics, "lang": cfg.lang, "split": cfg.split, "checkpoint": str(path),
               "step": ckpt["position"]["step"], "trained_lang": ckpt.get("meta", {}).get("lang"),
               "fusion_weight": weight, "items": len(evalset.items), "captions": len(evalset.captions),
               "items_in_split": n_in_split, "skipped": dict(counts), "views": list(dc.views),
               "ablate": list(mc.ablate),
               "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), "ranks": str(ranks_path)}
    tmp = metrics_path.with_name(f".{metrics_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(tmp, metrics_path)
    return EvaluateReport(metrics=result.metrics, lang=cfg.lang, split=cfg.split, checkpoint=str(path),
                          step=int(ckpt["position"]["step"]), fusion_weight=weight, items=len(evalset.items),
                          captions=len(evalset.captions), items_in_split=n_in_split, metrics_path=str(metrics_path),
                          ranks_path=str(ranks_path), wall_s=time.time() - started)


def print_summary(report: EvaluateReport) -> None:
    from rich.console import Console
    from rich.table import Table
    m = report.metrics
    table = Table(title=f"evaluate {report.lang} / {report.split}", show_header=True)
    table.add_column("direction")
    for col in ("R@1", "R@5", "R@10", "MedR", "MeanR"):
        table.add_column(col, justify="right")
    for d, label in (("t2v", "text -> visual"), ("v2t", "visual -> text")):
        table.add_row(label, *(f"{m[f'{d}_r{k}']:.2f}" for k in (1, 5, 10)), f"{m[f'{d}_medr']:.1f}",
                      f"{m[f'{d}_meanr']:.1f}")
    Console(stderr=True).print(table)
    Console(stderr=True).print(f"R@sum {m['rsum']:.2f} on {report.items} items / {report.captions} captions "
                               f"(fusion weight {report.fusion_weight}); checkpoint {report.checkpoint} "
                               f"(step {report.step}); wrote {report.metrics_path} and {report.ranks_path}")
