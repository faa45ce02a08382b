"""Benchmark readers: the published layouts of the LECCR benchmarks -> workdir Parquet.

    leccr-pipe import-benchmark --format FORMAT --input DIR --workdir W [--lang de,fr] [--media-root DIR]

One module per format; each declares its media type, its media-collection namespace (the
item-id prefix and default dataset name), the languages it has, how a native id is written in
a `--split-ids` file, and a `read(cfg, collector)` that parses the files found under --input.
`common.py` holds the shared policies and the writer (see its docstring).

| format    | media          | languages      | files (found by name anywhere under --input)           |
|-----------|----------------|----------------|--------------------------------------------------------|
| multi30k  | Flickr30K imgs | en de fr cs    | `<split>.<lang>[.gz]` + `image_splits/<split>.txt`     |
| flickr30k | Flickr30K imgs | en             | `results_20130124.token` or `results.csv`              |
| stair     | COCO images    | ja             | `stair_captions_v1.2_{train,val}[_tokenized].json`     |
| coco-cn   | COCO images    | zh             | `imageid.human-written-caption.txt` + `coco-cn_<split>.txt` |
| vatex     | videos         | en zh          | `vatex_<training|validation|...>*.json`                |
| msrvtt    | videos         | en zh          | `MSRVTT_data.json` / `*_videodatainfo.json` + MSR-VTT-CN file |
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipelines.readers.common import (Collector, ImportConfig, ImportReport, StageInputError, check_langs,
                                      load_split_ids, write_import)

# format name -> module (imported on use)
FORMATS = {
    "multi30k": "pipelines.readers.multi30k",
    "flickr30k": "pipelines.readers.flickr30k",
    "stair": "pipelines.readers.stair",
    "coco-cn": "pipelines.readers.coco_cn",
    "vatex": "pipelines.readers.vatex",
    "msrvtt": "pipelines.readers.msrvtt",
}

__all__ = ["FORMATS", "ImportConfig", "ImportReport", "run", "reader"]


def reader(fmt: str):
    if fmt not in FORMATS:
        raise StageInputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt])


def run(cfg: ImportConfig) -> ImportReport:
    mod = reader(cfg.format)
    root = Path(cfg.input).expanduser()
    if not root.is_dir():
        raise StageInputError(f"--input {root} is not a folder")
    media_root = Path(cfg.media_root).expanduser() if cfg.media_root else root
    if not media_root.is_dir():
        raise StageInputError(f"--media-root {media_root} is not a folder")
    langs = check_langs(cfg.format, mod.LANGS, tuple(cfg.langs))
    dataset = cfg.dataset or mod.NAMESPACE
    col = Collector(dataset, mod.NAMESPACE, mod.MEDIA, media_root.resolve(), langs)
    mod.read(root.resolve(), col, explicit_langs=bool(cfg.langs))
    override = load_split_ids(tuple(cfg.split_ids), mod.native_id)
    return write_import(cfg, col, override)
