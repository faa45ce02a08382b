"""Index and search: every item's and caption's embedding from a checkpoint, a vector index
over them, and queries by text (any language the checkpoint was trained for) or by image.

`build` (leccr-pipe index) writes WORKDIR/index/<run>/:
    items.parquet      one row per usable item: item_id, split, media_type, path, the
                       checkpoint's description views and their texts, embedding (v^)
    captions.parquet   one row per caption in the run's languages (human and mt): caption_id,
                       item_id, lang, origin, text, quality flags, embedding (h)
    items.faiss, captions.faiss, meta.json
Vectors are the model's L2-normalised global embeddings, so inner product = cosine = the
model's global score S_g. (The fused local score max_k h . m^_k is not an inner product; the
index ranks by S_g, which is what evaluation uses at fusion weight 0, the image default.)

Index kind: exact (faiss IndexFlatIP) below `exact_below` vectors, HNSW (IndexHNSWFlat, inner
product) at and above it; `meta.json` records which.

`search` (leccr-pipe search) encodes a query with the checkpoint the index was built from and
returns the top-k items (text query) or captions (image query) with scores.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import store

INDEX_DIR = "index"
EXACT_BELOW = 10_000          # vectors; exact search is fast enough below this on one CPU
HNSW_M = 32                   # graph degree; faiss' usual choice for recall ~0.99 at ef 64+
HNSW_EF_CONSTRUCTION = 200

ITEMS = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("media_type", pa.string()),
    pa.field("path", pa.string()),
    pa.field("views", pa.list_(pa.string())),
    pa.field("descriptions", pa.list_(pa.string())),          # one per view (null: none)
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),
], metadata={b"leccr.schema": b"index_items", b"leccr.schema_version": b"1"})
CAPTIONS = pa.schema([
    pa.field("caption_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("origin", pa.string(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("quality_flags", pa.list_(pa.string())),
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),
], metadata={b"leccr.schema": b"index_captions", b"leccr.schema_version": b"1"})


def _faiss():
    try:
        import faiss
    except ImportError:
        raise store.StageInputError("index/search need faiss: pip install 'leccr-pipe[search]' (faiss-cpu)") from None
    return faiss


# --------------------------------------------------------------------------- the vector index

def build_vector_index(vectors, exact_below: int = EXACT_BELOW):
    """faiss index over L2-normalised float32 rows [n, e]: exact below `exact_below` rows, HNSW
    (inner product) otherwise. Returns (index, kind)."""
    import numpy as np
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(x) < exact_below:
        index, kind = faiss.IndexFlatIP(x.shape[1]), "exact"
    else:
        index, kind = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT), "hnsw"
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(x)
    return index, kind


def search_vector_index(index, queries, k: int):
    """(scores [q, k], row indices [q, k]) of the k best rows; HNSW looks at >= 4k candidates."""
    import numpy as np
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(64, 4 * k)
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


# --------------------------------------------------------------------------- build

@dataclass
class IndexConfig:
    workdir: Path
    run: str                                  # the train run (default: the language)
    checkpoint: Path | None = None            # default: WORKDIR/checkpoints/<run>/best.pt, else last.pt
    splits: tuple[str, ...] = ()              # () = every split
    exact_below: int = EXACT_BELOW
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    out_dir: Path | None = None               # default WORKDIR/index/<run>
    progress: bool = True


@dataclass
class IndexReport:
    out_dir: str
    checkpoint: str
    step: int
    langs: list[str]
    items: int
    captions: int
    dim: int
    kind: dict[str, str]
    skipped: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _checkpoint_stamp(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _index_captions(captions: list[dict], items: dict, langs: set[str]) -> list[dict]:
    """Caption rows of indexed items in the run's languages, good ones only, in id order."""
    keep = [c for c in captions if c["item_id"] in items and (c["lang"] or "").lower() in langs
            and (c["text"] or "").strip() and c.get("error_kind") is None]
    return sorted(keep, key=lambda c: c["caption_id"])


def build(cfg: IndexConfig) -> IndexReport:
    import time

    import numpy as np

    from leccr_core.data import CaptionRecord, DataConfig
    from leccr_core.evaluate import embed_captions, embed_items
    from leccr_core.train import resolve_device
    from pipelines.evaluate import default_checkpoint, load_model, read_checkpoint
    from pipelines.progress import progress_bar
    from pipelines.train import read_workdir, usable_items

    started = time.time()
    _faiss()                                              # fail before any work without it
    path = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(cfg.workdir, cfg.run)
    ckpt = read_checkpoint(path)
    dc = DataConfig.from_dict(ckpt["data_config"])
    if dc.video_features:
        raise store.StageInputError("index: checkpoints trained on pre-extracted video features are not supported "
                                    "(there is no media file to show); index a CLIP-frames checkpoint")
    manifest, captions, descriptions = read_workdir(cfg.workdir, need_descriptions=bool(dc.views))
    counts: Counter = Counter()
    found, _, _ = usable_items(manifest, descriptions, dc.views, ckpt["model_config"]["media"], counts)
    items = {i: rec for i, (rec, split) in sorted(found.items()) if not cfg.splits or split in cfg.splits}
    if not items:
        raise store.StageInputError(f"no usable items to index in {cfg.workdir} (splits {cfg.splits or 'all'})")
    split_of = {i: split for i, (_, split) in found.items()}
    meta = ckpt.get("meta", {})
    langs = {x.lower() for x in (meta.get("source_lang") or "en", meta.get("lang") or cfg.run)}
    caps = _index_captions(captions, items, langs)

    device = resolve_device(cfg.device)
    model, tokenizer, _ = load_model(ckpt, device)
    records = list(items.values())
    position = {i: k for k, i in enumerate(items)}
    common = dict(device=device, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    with progress_bar("index: embed", len(records) + len(caps), enabled=cfg.progress) as advance:
        v_hat, _ = embed_items(model, records, tokenizer, dc, **common)
        advance(len(records))
        h = (embed_captions(model, [CaptionRecord(c["caption_id"], position[c["item_id"]], c["text"]) for c in caps],
                            tokenizer, dc, **common) if caps else None)
        advance(len(caps))

    out = cfg.out_dir or cfg.workdir / INDEX_DIR / cfg.run
    item_rows = [{"item_id": r.item_id, "split": split_of[r.item_id], "media_type": r.media_type,
                  "path": str(Path(r.root) / r.relpath), "views": list(dc.views), "descriptions": list(r.descriptions),
                  "embedding": v.tolist()} for r, v in zip(records, v_hat.numpy())]
    store.write_atomic(pa.Table.from_pylist(item_rows, schema=ITEMS), out / "items.parquet")
    kinds = {"items": _write_index(v_hat.numpy(), out / "items.faiss", cfg.exact_below)}
    cap_rows = [{"caption_id": c["caption_id"], "item_id": c["item_id"], "split": c["split"], "lang": c["lang"],
                 "origin": c["origin"], "text": c["text"], "quality_flags": c["quality_flags"] or [],
                 "embedding": e.tolist()} for c, e in zip(caps, h.numpy() if h is not None else np.zeros((0, 1)))]
    store.write_atomic(pa.Table.from_pylist(cap_rows, schema=CAPTIONS), out / "captions.parquet")
    if caps:
        kinds["captions"] = _write_index(h.numpy(), out / "captions.faiss", cfg.exact_below)
    report = IndexReport(out_dir=str(out), checkpoint=str(path), step=int(ckpt["position"]["step"]),
                         langs=sorted(langs), items=len(item_rows), captions=len(cap_rows),
                         dim=int(v_hat.shape[1]), kind=kinds, skipped=dict(counts), wall_s=time.time() - started)
    _write_json(out / "meta.json", {**report.as_dict(), "checkpoint_stamp": _checkpoint_stamp(path),
                                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                                    "score": "global (inner product of L2-normalised embeddings)"})
    return report


def _write_index(vectors, path: Path, exact_below: int) -> str:
    faiss = _faiss()
    index, kind = build_vector_index(vectors, exact_below)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return kind


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- search

@dataclass
class SearchConfig:
    workdir: Path
    run: str
    query: str | None = None                  # text query -> items
    image: Path | None = None                 # image query -> captions
    k: int = 5
    index_dir: Path | None = None             # default WORKDIR/index/<run>
    device: str = "auto"


@dataclass
class SearchResult:
    query: dict[str, Any]                     # {"text": ...} or {"image": ..., "descriptions": ...}
    target: str                               # items | captions
    hits: list[dict[str, Any]]
    index: dict[str, Any]                     # the index's meta (checkpoint, kind, counts)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Searcher:
    """An index folder loaded once (model, tables, faiss indexes) for many queries."""

    def __init__(self, index_dir: Path, device: str = "auto"):
        self.dir = Path(index_dir)
        if not (self.dir / "meta.json").is_file():                # before the heavy imports: fail fast
            raise store.StageInputError(f"no index in {self.dir}: run `leccr-pipe index` first")
        from leccr_core.data import DataConfig
        from leccr_core.train import resolve_device
        from pipelines.evaluate import load_model, read_checkpoint
        faiss = _faiss()
        self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
        checkpoint = Path(self.meta["checkpoint"])
        if not checkpoint.is_file() or _checkpoint_stamp(checkpoint) != self.meta["checkpoint_stamp"]:
            raise store.StageInputError(f"the index in {self.dir} was built from {checkpoint}, which is gone or has "
                                        "changed since: run `leccr-pipe index` again")
        ckpt = read_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.model, self.tokenizer, _ = load_model(ckpt, self.device)
        self.data_cfg = DataConfig.from_dict(ckpt["data_config"])
        self.items = pq.read_table(self.dir / "items.parquet").drop_columns(["embedding"]).to_pylist()
        self.captions = pq.read_table(self.dir / "captions.parquet").drop_columns(["embedding"]).to_pylist()
        self.item_index = faiss.read_index(str(self.dir / "items.faiss"))
        self.caption_index = (faiss.read_index(str(self.dir / "captions.faiss"))
                              if (self.dir / "captions.faiss").is_file() else None)

    def encode_texts(self, texts: list[str]):
        from leccr_core.data import CaptionRecord
        from leccr_core.evaluate import embed_captions
        records = [CaptionRecord(f"query-{n}", 0, t) for n, t in enumerate(texts)]
        return embed_captions(self.model, records, self.tokenizer, self.data_cfg, self.device).numpy()

    def text(self, query: str, k: int = 5) -> SearchResult:
        if not query.strip():
            raise store.StageInputError("the query is empty")
        scores, rows = search_vector_index(self.item_index, self.encode_texts([query]), k)
        hits = [self._item_hit(rank, float(s), int(r)) for rank, (s, r) in enumerate(zip(scores[0], rows[0]), 1)
                if r >= 0]
        return SearchResult(query={"text": query}, target="items", hits=hits, index=self.meta)

    def _item_hit(self, rank: int, score: float, row: int) -> dict:
        item = self.items[row]
        return {"rank": rank, "score": round(score, 6), "item_id": item["item_id"], "path": item["path"],
                "split": item["split"], "media_type": item["media_type"],
                "descriptions": dict(zip(item["views"] or [], item["descriptions"] or []))}

    def image(self, path: Path, k: int = 5) -> SearchResult:
        """Nearest captions of an image file. An indexed item's own descriptions are used when
        the file is one; another image has none (its slots come from an empty description)."""
        from leccr_core.data import ItemRecord
        from leccr_core.evaluate import embed_items
        path = Path(path)
        if not path.is_file():
            raise store.StageInputError(f"--image {path}: no such file")
        if self.caption_index is None:
            raise store.StageInputError(f"the index in {self.dir} holds no captions")
        resolved = str(path.resolve())
        known = next((it for it in self.items if it["path"] and str(Path(it["path"]).resolve()) == resolved), None)
        notes = []
        if known is not None:
            descriptions = tuple(known["descriptions"] or ())
            notes.append(f"the image is indexed item {known['item_id']}: its descriptions are used")
        else:
            descriptions = (None,) * len(self.data_cfg.views)
            if self.data_cfg.views:
                notes.append("the image is not an indexed item: no description (run describe on it for better "
                             "results)")
        record = ItemRecord("query", "image", str(path.resolve().parent), path.name, descriptions)
        from leccr_core.data import MediaLoadError
        try:
            v_hat, _ = embed_items(self.model, [record], self.tokenizer, self.data_cfg, self.device)
        except MediaLoadError as err:
            raise store.StageInputError(f"--image {path}: {err}") from None
        scores, rows = search_vector_index(self.caption_index, v_hat.numpy(), k)
        hits = []
        for rank, (s, r) in enumerate(zip(scores[0], rows[0]), 1):
            if r < 0:
                continue
            c = self.captions[int(r)]
            hits.append({"rank": rank, "score": round(float(s), 6), "caption_id": c["caption_id"],
                         "item_id": c["item_id"], "lang": c["lang"], "origin": c["origin"], "text": c["text"],
                         "quality_flags": c["quality_flags"] or []})
        return SearchResult(query={"image": str(path), "descriptions": list(descriptions)}, target="captions",
                            hits=hits, index=self.meta, notes=notes)


def search(cfg: SearchConfig) -> SearchResult:
    if (cfg.query is None) == (cfg.image is None):
        raise store.StageInputError("give one of --query TEXT or --image FILE")
    if cfg.k < 1:
        raise store.StageInputError("-k must be at least 1")
    searcher = Searcher(cfg.index_dir or cfg.workdir / INDEX_DIR / cfg.run, cfg.device)
    return searcher.text(cfg.query, cfg.k) if cfg.query is not None else searcher.image(cfg.image, cfg.k)


def print_search(result: SearchResult) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    what = result.query.get("text") or result.query.get("image")
    table = Table(title=f"search: {what!r} -> {result.target} (checkpoint step {result.index.get('step')}, "
                        f"{result.index.get('kind', {}).get(result.target, '?')} index)")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    if result.target == "items":
        table.add_column("item / path")
        table.add_column("descriptions")
        for h in result.hits:
            desc = "\n".join(f"{v}: {(t or '')[:120]}" for v, t in h["descriptions"].items()) or "-"
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", f"{h['item_id']} ({h['split']})\n{h['path']}", desc)
    else:
        table.add_column("caption")
        table.add_column("lang / origin / item")
        for h in result.hits:
            flags = f" [{', '.join(h['quality_flags'])}]" if h["quality_flags"] else ""
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", h["text"],
                          f"{h['lang']} {h['origin']}{flags}\n{h['item_id']}")
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
