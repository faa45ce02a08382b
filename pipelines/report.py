"""`leccr-pipe report`: one self-contained HTML page (WORKDIR/report.html) about a workdir.

What it shows, each read from the files the stages wrote (nothing is re-run except the
example searches, and those only when an index exists and no saved searches do):
- the stages run and their summaries (WORKDIR/reports/<stage>.json, plus counts read from
  the manifest, descriptions and captions);
- a gallery: thumbnails (inline JPEG), each item's descriptions per view, its English
  captions with their machine translations and quality flags, and its human references;
- error rows of every stage, grouped by kind, with examples;
- training curves (loss; validation R@sum) per run from logs/train-<run>/train.jsonl, and
  recall@K bars per language, split and direction from eval/*.json (matplotlib, inline PNG);
- search examples (WORKDIR/search/*.json, else a few held-out queries run on the index).
Images and plots are data: URIs, so the file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemas
from pipelines import store

REPORTS_DIR = "reports"       # <stage>.json summaries (the demo and recipes write them; --report-json may)
SEARCH_DIR = "search"         # saved search results (JSON, SearchResult.as_dict())
THUMB_PX = 160


@dataclass
class ReportConfig:
    workdir: Path
    out: Path | None = None              # default WORKDIR/report.html
    gallery: int = 24                    # items in the gallery
    example_searches: int = 3            # when an index exists and no searches were saved


@dataclass
class ReportResult:
    path: Path
    sections: dict[str, int] = field(default_factory=dict)   # section -> number of entries shown
    notes: list[str] = field(default_factory=list)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


# --------------------------------------------------------------------------- reading

def _read_rows(folder: Path, schema, columns: list[str] | None = None) -> list[dict]:
    if not store.parquet_files(folder):
        return []
    return store.read_folder(folder, schema, columns=columns).to_pylist()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _latest_per_view(descriptions: list[dict]) -> dict[str, dict[str, dict]]:
    """item -> view -> the newest row (errors included: the gallery shows them as such)."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in sorted(descriptions, key=lambda r: (r["created_at"] is not None, r["created_at"] or 0)):
        out[r["item_id"]][r["view"]] = r
    return out


# --------------------------------------------------------------------------- pieces of the page

def thumbnail(root: str, relpath: str) -> str | None:
    """A data: URI JPEG thumbnail of an image or of a video's middle frame; None if unreadable
    (the media loader's own checks: confinement to the item's root, bombs, corrupt files).
    The root is a local path or a URI (media that describe read from object storage)."""
    from PIL import Image

    from pipelines.media import MediaConfig, MediaError, load_media
    try:
        media = load_media(root, relpath, MediaConfig(max_pixels=THUMB_PX * THUMB_PX * 2, video_frames=3))
    except MediaError:
        return None
    pixels = media.pixels if media.pixels.ndim == 3 else media.pixels[len(media.pixels) // 2]
    image = Image.fromarray(pixels)
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise store.StageInputError("the report draws its plots with matplotlib: pip install "
                                    "'leccr-pipe[report]'") from None
    matplotlib.use("Agg")              # no display needed, and no GUI backend chosen at random
    import matplotlib.pyplot as plt
    return plt


def training_curves(log: Path, run: str) -> str | None:
    """Loss per step and validation R@sum per evaluation of one run, as a PNG data: URI."""
    steps, losses, evals = [], [], []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "eval" and "rsum" in rec:
            evals.append((rec["step"], rec["rsum"]))
        elif "loss" in rec and "event" not in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    if not steps:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, losses, color="#1f77b4", linewidth=1)
    axes[0].set(title=f"{run}: training loss", xlabel="step", ylabel="loss")
    if evals:
        axes[1].plot([s for s, _ in evals], [v for _, v in evals], marker="o", color="#d62728")
        axes[1].set(title=f"{run}: validation R@sum", xlabel="step", ylabel="R@sum")
    else:
        axes[1].text(0.5, 0.5, "no validation in this run", ha="center", va="center")
        axes[1].set_axis_off()
    for ax in axes:
        ax.grid(alpha=0.3)
    return _figure_uri(fig)


def recall_plot(evals: list[dict]) -> str | None:
    """R@1/5/10 bars, one group per (language, split, checkpoint) and direction."""
    if not evals:
        return None
    plt = _pyplot()
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    width = 0.8 / len(evals)
    for ax, direction, title in ((axes[0], "t2v", "text -> visual"), (axes[1], "v2t", "visual -> text")):
        for n, ev in enumerate(evals):
            values = [ev["metrics"][f"{direction}_r{k}"] for k in (1, 5, 10)]
            ax.bar(np.arange(3) + n * width, values, width, label=ev["label"])
        ax.set_xticks(np.arange(3) + width * (len(evals) - 1) / 2, ["R@1", "R@5", "R@10"])
        ax.set(title=title, ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[1].legend(fontsize=7, loc="upper left")
    return _figure_uri(fig)


# --------------------------------------------------------------------------- sections

def _table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _flat(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return esc(text if len(text) <= limit else text[:limit] + " ...")


STAGE_ORDER = ("ingest", "import-benchmark", "describe", "translate", "train", "evaluate", "index")


def _facts(data: dict, limit: int = 10) -> str:
    """The short scalar fields of a summary (numbers rounded), for one table cell."""
    facts = []
    for key, value in data.items():
        if isinstance(value, bool) or value is None or (isinstance(value, str) and ("/" in value or len(value) > 40)):
            continue
        if isinstance(value, float):
            facts.append(f"{key} {value:.2f}")
        elif isinstance(value, (int, str)):
            facts.append(f"{key} {value}")
        elif key in ("errors", "metrics", "skipped", "kind") and isinstance(value, dict) and value:
            facts.append(f"{key} " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in list(value.items())[:8]))
    return esc(" \u00b7 ".join(facts[:limit]))


def stages_section(workdir: Path, manifest, captions, descriptions) -> tuple[str, int]:
    """Counts read from the data, then one row per saved stage summary (full JSON folded)."""
    splits = Counter((r["split"] or "-") for r in manifest)
    rows = [("manifest", esc(f"{len(manifest)} items; " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))),
            ("descriptions", esc(f"{len(descriptions)} rows; views "
                                 + (", ".join(sorted({r["view"] for r in descriptions})) or "-"))),
            ("captions", esc(", ".join(f"{lang} {origin} {n}" for (lang, origin), n in
                                       sorted(Counter((r["lang"], r["origin"]) for r in captions).items())) or "-"))]
    data_table = _table(rows, ("data", "rows"))
    summaries = sorted((workdir / REPORTS_DIR).glob("*.json")) if (workdir / REPORTS_DIR).is_dir() else []

    def order(path: Path) -> tuple:
        base = next((s for s in STAGE_ORDER if path.stem == s or path.stem.startswith(s + "-")), None)
        return (STAGE_ORDER.index(base) if base else len(STAGE_ORDER), path.stem)
    stage_rows = []
    for path in sorted(summaries, key=order):
        data = _read_json(path)
        if isinstance(data, dict):
            full = esc(json.dumps(data, indent=1, ensure_ascii=False, default=str))
            stage_rows.append((f"<b>{esc(path.stem)}</b>",
                               f"{_facts(data)}<details><summary>all fields</summary><pre>{full}</pre></details>"))
    stages = _table(stage_rows, ("stage", "summary")) if stage_rows else "<p>No saved stage summaries.</p>"
    return data_table + stages, len(stage_rows)


def gallery_section(manifest, captions, descriptions, limit: int) -> tuple[str, int, int]:
    """Cards for up to `limit` readable items (val/test first: they have human references)."""
    by_item = _latest_per_view(descriptions)
    caps: dict[str, list[dict]] = defaultdict(list)
    for c in captions:
        caps[c["item_id"]].append(c)
    translations: dict[str, list[dict]] = defaultdict(list)
    for c in captions:
        if c["origin"] == "mt" and c["source_caption_id"]:
            translations[c["source_caption_id"]].append(c)
    order = {"test": 0, "val": 1}
    good = [r for r in manifest if r["error_kind"] is None and r["relpath"]]
    chosen = sorted(good, key=lambda r: (order.get(r["split"] or "", 2), r["item_id"]))[:limit]
    cards, shown = [], 0
    for r in chosen:
        uri = thumbnail(r["root"], r["relpath"])
        shown += uri is not None
        img = (f'<img class="thumb" src="{uri}" alt="{esc(r["relpath"])}">' if uri
               else '<div class="thumb missing">no preview</div>')
        views = "".join(
            f"<li><b>{esc(v)}</b>: " + (f'<span class="err">{esc(d["error_kind"])}</span>' if d["error_kind"]
                                         else esc(d["text"])) + "</li>"
            for v, d in sorted(by_item.get(r["item_id"], {}).items()))
        lines = []
        for c in sorted(caps.get(r["item_id"], []), key=lambda c: (c["origin"] != "human", c["lang"], c["caption_id"])):
            if c["origin"] != "human":
                continue
            lines.append(f"<li><b>{esc(c['lang'])}</b> {esc(c['text'])}<ul>" + "".join(
                f"<li>&rarr; <b>{esc(t['lang'])}</b> {esc(t['text'])}"
                + "".join(f' <span class="flag">{esc(f)}</span>' for f in (t["quality_flags"] or []))
                + (f' <span class="err">{esc(t["error_kind"])}</span>' if t["error_kind"] else "") + "</li>"
                for t in translations.get(c["caption_id"], [])) + "</ul></li>")
        cards.append(f'<div class="card">{img}<div class="meta">{esc(r["media_type"])} &middot; '
                     f'{esc(r["split"])} &middot; <code>{esc(r["item_id"])}</code><br><small>{esc(r["relpath"])}'
                     f'</small></div><h4>descriptions</h4><ul>{views or "<li>none</li>"}</ul>'
                     f'<h4>captions</h4><ul>{"".join(lines) or "<li>none</li>"}</ul></div>')
    return f'<div class="gallery">{"".join(cards)}</div>', len(cards), shown


def errors_section(manifest, captions, descriptions) -> tuple[str, int]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for stage, rows, key in (("ingest", manifest, "item_id"), ("describe", descriptions, "item_id"),
                             ("translate", captions, "caption_id")):
        for r in rows:
            if r.get("error_kind"):
                groups[(stage, r["error_kind"])].append({"id": r[key], "error": r.get("error")})
    if not groups:
        return "<p>No error rows.</p>", 0
    rows = [(esc(stage), esc(kind), str(len(found)),
             "<br>".join(f"<code>{esc(e['id'])}</code> {esc(e['error'])}" for e in found[:3]))
            for (stage, kind), found in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    return _table(rows, ("stage", "kind", "rows", "examples")), len(groups)


def plots_section(workdir: Path) -> tuple[str, int]:
    parts, n = [], 0
    for log in sorted((workdir / "logs").glob("train-*/train.jsonl")):
        uri = training_curves(log, log.parent.name.removeprefix("train-"))
        if uri:
            parts.append(f'<img class="plot" src="{uri}" alt="training curves {esc(log.parent.name)}">')
            n += 1
    evals = []
    for path in sorted((workdir / "eval").glob("*.json")):
        data = _read_json(path)
        if isinstance(data, dict) and "metrics" in data:
            evals.append({"label": f"{data.get('lang')} {data.get('split')} ({Path(str(data.get('checkpoint'))).stem})",
                          "metrics": data["metrics"]})
    uri = recall_plot(evals)
    if uri:
        parts.append(f'<img class="plot" src="{uri}" alt="recall at K">')
        rows = [(esc(e["label"]), *(f"{e['metrics'][f'{d}_r{k}']:.1f}" for d in ("t2v", "v2t") for k in (1, 5, 10)),
                 f"{e['metrics']['rsum']:.1f}") for e in evals]
        parts.append(_table(rows, ("evaluation", "t2v R@1", "R@5", "R@10", "v2t R@1", "R@5", "R@10", "R@sum")))
        n += 1
    return "".join(parts) or "<p>No training logs or evaluations yet.</p>", n


def _example_searches(workdir: Path, count: int) -> list[dict]:
    """Held-out human captions of the run's language as queries on its index (test split first)."""
    import pyarrow.parquet as pq

    from pipelines.index import INDEX_DIR, Searcher
    results = []
    for folder in sorted(p for p in (workdir / INDEX_DIR).glob("*") if (p / "meta.json").is_file()):
        caps = pq.read_table(folder / "captions.parquet", columns=["item_id", "split", "lang", "origin", "text"])
        queries = [c for c in caps.to_pylist() if c["origin"] == "human" and c["lang"] != "en"
                   and c["split"] in ("test", "val")]
        queries.sort(key=lambda c: (c["split"] != "test", c["item_id"]))
        if not queries:
            continue
        searcher = Searcher(folder)
        for c in queries[:count]:
            result = searcher.text(c["text"], 5).as_dict()
            result["expected_item"] = c["item_id"]
            results.append(result)
    return results


def search_section(workdir: Path, count: int, thumbs: dict[str, str | None]) -> tuple[str, int, str]:
    saved = [_read_json(p) for p in sorted((workdir / SEARCH_DIR).glob("*.json"))] if (workdir / SEARCH_DIR).is_dir() else []
    saved = [s for s in saved if isinstance(s, dict) and "hits" in s]
    origin = "saved searches (WORKDIR/search/)"
    if not saved and count:
        saved, origin = _example_searches(workdir, count), "held-out captions run on the index by this report"
    if not saved:
        return "<p>No index yet (run <code>leccr-pipe index</code>).</p>", 0, origin
    blocks = []
    for s in saved:
        q = s["query"]
        expected = s.get("expected_item")
        if s["target"] == "items":
            cells = []
            for h in s["hits"]:
                # an indexed item's path (confined when it was ingested)
                uri = thumbs.get(h["item_id"]) or thumbnail(Path(h["path"]).parent, Path(h["path"]).name)
                thumbs[h["item_id"]] = uri
                mark = " hit" if expected and h["item_id"] == expected else ""
                img = f'<img class="thumb small" src="{uri}" alt="{esc(h["item_id"])}">' if uri else "no preview"
                cells.append(f'<div class="result{mark}">{img}<br>#{h["rank"]} {h["score"]:.3f}<br>'
                             f'<code>{esc(h["item_id"])}</code></div>')
            title = f'text: &ldquo;{esc(q.get("text"))}&rdquo;'
            if expected:
                title += f' <small>(expected item <code>{esc(expected)}</code>)</small>'
            blocks.append(f'<div class="search"><h4>{title}</h4><div class="results">{"".join(cells)}</div></div>')
        else:
            rows = [(str(h["rank"]), f"{h['score']:.3f}", esc(h["text"]), esc(f"{h['lang']} {h['origin']}"))
                    for h in s["hits"]]
            blocks.append(f'<div class="search"><h4>image: {esc(q.get("image"))}</h4>'
                          f'{_table(rows, ("#", "score", "caption", "lang / origin"))}</div>')
    return "".join(blocks), len(saved), origin


# --------------------------------------------------------------------------- page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { margin-bottom: 0; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; background: white; }
td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 12px; }
.card h4 { margin: 6px 0 2px; } .card ul { margin: 0; padding-left: 16px; }
.thumb { width: 160px; height: 120px; object-fit: contain; background: #eee; display: block; }
.thumb.small { width: 96px; height: 72px; } .missing { text-align: center; line-height: 120px; color: #999; }
.flag { background: #ffe9a8; border-radius: 3px; padding: 0 3px; font-size: 11px; }
.err { background: #ffc9c9; border-radius: 3px; padding: 0 3px; }
.plot { max-width: 100%; display: block; margin: 8px 0; background: white; }
.results { display: flex; gap: 8px; flex-wrap: wrap; } .result { font-size: 11px; text-align: center; padding: 4px; }
.result.hit { outline: 3px solid #2ca02c; } .note { color: #666; font-size: 12px; }\npre { font-size: 11px; max-height: 300px; overflow: auto; } summary { cursor: pointer; color: #555; }
"""


def build(cfg: ReportConfig) -> ReportResult:
    import datetime as dt
    workdir = Path(cfg.workdir)
    if not (workdir / store.MANIFEST_DIR).is_dir():
        raise store.StageInputError(f"{workdir} has no manifest: run a stage (e.g. `leccr-pipe ingest`) first")
    _pyplot()                                             # fail before any work without matplotlib
    manifest = _read_rows(workdir / store.MANIFEST_DIR, schemas.MANIFEST)
    captions = _read_rows(workdir / store.CAPTIONS_DIR, schemas.CAPTIONS)
    descriptions = _read_rows(workdir / store.DESCRIPTIONS_DIR, schemas.DESCRIPTIONS)
    result = ReportResult(path=cfg.out or workdir / "report.html")
    stages, result.sections["stage summaries"] = stages_section(workdir, manifest, captions, descriptions)
    gallery, result.sections["gallery"], thumbs_shown = gallery_section(manifest, captions, descriptions, cfg.gallery)
    if thumbs_shown < result.sections["gallery"]:
        result.notes.append(f"{result.sections['gallery'] - thumbs_shown} gallery items have no preview")
    errors, result.sections["error kinds"] = errors_section(manifest, captions, descriptions)
    plots, result.sections["plots"] = plots_section(workdir)
    searches, result.sections["searches"], search_origin = search_section(workdir, cfg.example_searches, {})
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>leccr-pipe report: {esc(workdir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>leccr-pipe report</h1><p class="note">{esc(workdir.resolve())} &middot; {created}</p>
<h2>Stages</h2>{stages}
<h2>Training and evaluation</h2>{plots}
<h2>Search examples</h2><p class="note">{esc(search_origin)}; a green frame marks the expected item.</p>{searches}
<h2>Gallery</h2>{gallery}
<h2>Errors</h2>{errors}
</body></html>
"""
    result.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.path.with_name(f".{result.path.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, result.path)
    return result
