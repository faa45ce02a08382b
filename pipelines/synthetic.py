"""A synthetic cross-lingual workdir, tiny local encoders, and a learning check with ablations.

`make_synthetic_workdir` draws scenes with the sample dataset's drawer (pipelines.sample_data:
one or two coloured shapes on a coloured background) and writes a workdir every later stage
reads as it reads a real one:
- manifest + English human captions, through the real ingest (COCO-style JSON per split:
  captions_train.json, captions_val.json, captions_test.json -> splits train / val / test);
- captions/mt-<lang>-synthetic.parquet: a German rendering of every *train* English caption,
  origin "mt" with source_caption_id (standing in for the translate stage);
- captions/human-<lang>.parquet: German captions of the val/test items, origin "human",
  phrased with *other* templates than the "translations" (as real human captions differ
  from machine translations of English ones);
- descriptions/part-synthetic.parquet: per item, views "detailed" and "objects" (English
  text built from the scene's facts, standing in for MLLM output; provenance engine
  "synthetic") and "empty" (an empty description, for the no-description ablation).
Every caption is true by construction: all are phrased from the same structured facts.

`build_tiny_encoders` saves a tiny CLIP vision tower and a tiny BERT with a WordPiece vocab
built from the workdir's words, so training runs offline in minutes on CPU.

`learning_check` trains on the workdir through the real train and evaluate stages and reports
target-language text->image R@1 on test against chance; with ablations it also trains the
`--ablate` variants (no softened matching, no slots, no descriptions: real switches that
remove the parts and their parameters), and scores the full model global-only and fused.
`chance_metrics` gives the distribution of every metric under random scores for a split's
own caption -> item structure, from which the learning test sets its thresholds.
    python -m pipelines.synthetic learn --out runs/learn [--ablations] [--steps 300]
    python -m pipelines.synthetic make --workdir runs/synth [--train 400 --val 50 --test 100]
"""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

import schemas
from pipelines import ids, store
from pipelines.sample_data import make_image_scene, render_scene
from pipelines.tiny_models import build_tiny_encoders  # noqa: F401 - part of this module's API (tests, bench)

ENGINE = "synthetic"
MODEL = "leccr-pipe/synthetic-templates"
SCALE = 4          # scenes are drawn at the sample data's sizes, then saved 4x smaller (e.g. 80x60)

# --------------------------------------------------------------------------- German phrasing

DE_COLOR = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "orange": "orangefarben",
            "purple": "violett", "pink": "rosafarben", "white": "weiß", "black": "schwarz", "gray": "grau",
            "brown": "braun", "cyan": "türkis"}
DE_SHAPE = {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
            "star": ("Stern", "m"), "diamond": ("Raute", "f")}
DE_SIZE = {"small": "klein", "large": "groß"}
DE_WHERE = {"top left": "oben links", "top": "oben", "top right": "oben rechts", "left": "links",
            "center": "in der Mitte", "right": "rechts", "bottom left": "unten links", "bottom": "unten",
            "bottom right": "unten rechts"}
DE_RELATION = {"left of": "links von", "right of": "rechts von", "above": "über", "below": "unter"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
EN_LINK = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}

# indefinite article + adjective ending per case and gender
_ARTICLE = {"nom": {"m": ("ein", "er"), "n": ("ein", "es"), "f": ("eine", "e")},
            "acc": {"m": ("einen", "en"), "n": ("ein", "es"), "f": ("eine", "e")},
            "dat": {"m": ("einem", "en"), "n": ("einem", "en"), "f": ("einer", "en")}}


def de_noun_phrase(shape: dict, case: str = "nom", with_size: bool = False) -> str:
    """'ein kleiner roter Kreis', 'einem roten Quadrat', 'eine rote Raute' ..."""
    noun, gender = DE_SHAPE[shape["shape"]]
    article, ending = _ARTICLE[case][gender]
    adjectives = [DE_COLOR[shape["color"]] + ending]
    if with_size and shape.get("size") in DE_SIZE:
        adjectives.insert(0, DE_SIZE[shape["size"]] + ending)
    return " ".join([article, *adjectives, noun])


def de_background(color: str, case: str = "dat_strong") -> str:
    """Hintergrund is masculine: 'auf blauem Hintergrund' (strong dative)."""
    return {"dat_strong": f"{DE_COLOR[color]}em Hintergrund",
            "dat": f"einem {DE_COLOR[color]}en Hintergrund"}[case]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _en_np(shape: dict, with_size: bool = False) -> str:
    size = f"{shape['size']} " if with_size and shape.get("size") in ("small", "large") else ""
    return _a(f"{size}{shape['color']} {shape['shape']}")


def _en_where(position: str) -> str:
    if position == "center":
        return "in the center"
    return f"in the {position} corner" if " " in position else f"at the {position}"


def en_de_caption_pairs(scene: dict) -> list[tuple[str, str]]:
    """(English caption, its German 'machine translation') options for a scene."""
    bg, shapes = scene["background"], scene["shapes"]
    if len(shapes) == 1:
        (s,) = shapes
        return [
            (f"{_en_np(s)} on {_a(bg)} background",
             f"{de_noun_phrase(s)} auf {de_background(bg, 'dat')}"),
            (f"{_en_np(s, True)} {_en_where(s['position'])} of the image",
             f"{de_noun_phrase(s, with_size=True)} {DE_WHERE[s['position']]} im Bild"),
            (f"a plain {bg} background with {_en_np(s)}",
             f"ein schlichter {DE_COLOR[bg]}er Hintergrund mit {de_noun_phrase(s, 'dat')}"),
            (f"{_en_np(s)} drawn {_en_where(s['position'])}",
             f"{de_noun_phrase(s)}, {DE_WHERE[s['position']]} gezeichnet"),
        ]
    first, second = shapes
    rel = scene["relation"]
    return [
        (f"{_en_np(first)} {EN_LINK[rel]} {_en_np(second)} on {_a(bg)} background",
         f"{de_noun_phrase(first)} {DE_RELATION[rel]} {de_noun_phrase(second, 'dat')} auf {de_background(bg, 'dat')}"),
        (f"{_en_np(second)} {EN_LINK[INVERSE[rel]]} {_en_np(first)}",
         f"{de_noun_phrase(second)} {DE_RELATION[INVERSE[rel]]} {de_noun_phrase(first, 'dat')}"),
        (f"two shapes on {bg}: {_en_np(first)} and {_en_np(second)}",
         f"zwei Formen auf {DE_COLOR[bg]}em Grund: {de_noun_phrase(first)} und {de_noun_phrase(second)}"),
        (f"{_en_np(first, True)} and {_en_np(second, True)} on {_a(bg)} background",
         f"{de_noun_phrase(first, with_size=True)} und {de_noun_phrase(second, with_size=True)} auf "
         f"{de_background(bg, 'dat')}"),
    ]


def de_human_captions(scene: dict) -> list[str]:
    """German captions 'written by people': other templates than the translations."""
    bg, shapes = scene["background"], scene["shapes"]
    if len(shapes) == 1:
        (s,) = shapes
        return [f"{de_noun_phrase(s)} vor {de_background(bg)}",
                f"auf {de_background(bg)} sieht man {de_noun_phrase(s, 'acc')}",
                f"{de_noun_phrase(s, with_size=True)} {DE_WHERE[s['position']]}, der Hintergrund ist {DE_COLOR[bg]}"]
    first, second = shapes
    rel = scene["relation"]
    return [f"{de_noun_phrase(first)} und {de_noun_phrase(second)} vor {de_background(bg)}",
            f"{de_noun_phrase(second)} ist {DE_RELATION[INVERSE[rel]]} {de_noun_phrase(first, 'dat')}",
            f"auf {de_background(bg)}: {de_noun_phrase(first)} {DE_RELATION[rel]} {de_noun_phrase(second, 'dat')}"]


def descriptions_for(scene: dict) -> dict[str, str]:
    """Stand-ins for MLLM descriptions, one per view, from the scene's facts (English)."""
    bg, shapes = scene["background"], scene["shapes"]
    sentences = [f"The image shows {_en_np(s, True)} {_en_where(s['position'])} of the picture." for s in shapes]
    if len(shapes) == 2:
        first, second = shapes
        sentences.append(f"The {first['color']} {first['shape']} is {EN_LINK[scene['relation']]} "
                         f"the {second['color']} {second['shape']}.")
    sentences.append(f"The background is plain {bg}, with nothing else in the picture.")
    objects = "; ".join(f"{s['color']} {s['shape']} ({s['size']}, {s['position']})" for s in shapes)
    return {"detailed": " ".join(sentences), "objects": f"Objects: {objects}; background: {bg}.", "empty": ""}


# --------------------------------------------------------------------------- the workdir

@dataclass
class SyntheticReport:
    workdir: Path
    items: dict[str, int]
    captions: dict[str, int]
    descriptions: int


def _caption_rows(rows: list[dict], now: dt.datetime) -> pa.Table:
    empty = {f.name: None for f in schemas.CAPTIONS}
    prov = {"engine": ENGINE, "model": MODEL, "model_revision": "1", "prompt": None, "sampling": None,
            "fingerprint": ids.fingerprint({"stage": "synthetic", "model": MODEL}), "created_at": now}
    return pa.Table.from_pylist([{**empty, **prov, **r} for r in rows], schema=schemas.CAPTIONS)


def make_synthetic_workdir(workdir: Path, n_train: int = 400, n_val: int = 50, n_test: int = 100,
                           lang: str = "de", seed: int = 0, captions_per_item: int = 2) -> SyntheticReport:
    """Write the synthetic data under workdir/data and the stage files under workdir."""
    from pipelines import ingest

    if lang != "de":
        raise ValueError("the synthetic templates are German only (lang='de')")
    workdir = Path(workdir)
    data = workdir / "data"
    rng = random.Random(seed)
    scenes: dict[str, list[dict]] = {}
    image_no = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        images, annotations, split_scenes = [], [], []
        for _ in range(n):
            image_no += 1
            scene = make_image_scene(rng)
            file_name = f"images/{image_no:06d}.png"
            (data / "images").mkdir(parents=True, exist_ok=True)
            picture = render_scene(scene["width"], scene["height"], scene["background"], scene["shapes"])
            picture.resize((scene["width"] // SCALE, scene["height"] // SCALE), resample=3).save(data / file_name)
            images.append({"id": image_no, "file_name": file_name})
            options = en_de_caption_pairs(scene)
            chosen = rng.sample(range(len(options)), captions_per_item)
            for k in chosen:
                annotations.append({"id": len(annotations) + 1 + 100 * image_no, "image_id": image_no,
                                    "caption": options[k][0]})
            split_scenes.append({"id": image_no, "file_name": file_name, "pairs": [options[k] for k in chosen],
                                 "de_human": rng.sample(de_human_captions(scene), captions_per_item), **scene})
        (data / "annotations").mkdir(parents=True, exist_ok=True)
        (data / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations}, ensure_ascii=False), encoding="utf-8")
        scenes[split] = split_scenes
    (data / "annotations" / "scenes.json").write_text(json.dumps(scenes, ensure_ascii=False, indent=1),
                                                      encoding="utf-8")
    ingest.run(ingest.IngestConfig(input=data, workdir=workdir, dataset="synthetic"))

    manifest = store.read_folder(workdir / store.MANIFEST_DIR, schemas.MANIFEST).to_pylist()
    item_of = {r["source_id"]: r["item_id"] for r in manifest}
    en = store.read_folder(workdir / store.CAPTIONS_DIR, schemas.CAPTIONS).to_pylist()
    en_by_text = {(r["item_id"], r["text"]): r for r in en if r["lang"] == "en"}
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    mt_rows, human_rows, desc_rows = [], [], []
    for split, split_scenes in scenes.items():
        for scene in split_scenes:
            item = item_of[str(scene["id"])]
            if split == "train":
                for en_text, de_text in scene["pairs"]:
                    src = en_by_text[(item, en_text)]
                    mt_rows.append({"caption_id": ids.caption_id(item, lang, f"mt:{src['caption_id']}"),
                                    "item_id": item, "split": split, "lang": lang, "text": de_text, "origin": "mt",
                                    "source_caption_id": src["caption_id"], "source_lang": "en",
                                    "quality_flags": [], "length_ratio": len(de_text) / max(1, len(en_text))})
            else:
                for k, text in enumerate(scene["de_human"]):
                    human_rows.append({"caption_id": ids.caption_id(item, lang, f"human:{k}"), "item_id": item,
                                       "split": split, "lang": lang, "text": text, "origin": "human",
                                       "engine": None, "model": None, "model_revision": None, "fingerprint": None,
                                       "created_at": None})
            for view, text in descriptions_for(scene).items():
                desc_rows.append({"item_id": item, "view": view, "media_type": "image", "text": text,
                                  "finish_reason": "stop", "n_frames": 1, "width": scene["width"] // SCALE,
                                  "height": scene["height"] // SCALE, "engine": ENGINE, "model": MODEL,
                                  "model_revision": "1", "prompt": f"synthetic:{view}", "sampling": "{}",
                                  "fingerprint": ids.fingerprint({"stage": "describe", "engine": ENGINE, "view": view}),
                                  "prompt_tokens": 0, "output_tokens": len(text.split()), "latency_s": 0.0,
                                  "created_at": now, "error_kind": None, "error": None})
    store.write_atomic(_caption_rows(mt_rows, now), workdir / store.CAPTIONS_DIR / f"mt-{lang}-synthetic.parquet")
    human = _caption_rows(human_rows, now)
    store.write_atomic(human, workdir / store.CAPTIONS_DIR / f"human-{lang}.parquet")
    store.write_atomic(pa.Table.from_pylist(desc_rows, schema=schemas.DESCRIPTIONS),
                       workdir / store.DESCRIPTIONS_DIR / "part-synthetic.parquet")
    return SyntheticReport(workdir=workdir, items={s: len(v) for s, v in scenes.items()},
                           captions={"en": len(en), f"mt-{lang}": len(mt_rows), f"human-{lang}": len(human_rows)},
                           descriptions=len(desc_rows))


# --------------------------------------------------------------------------- tiny encoders

def workdir_texts(workdir: Path) -> list[str]:
    caps = store.read_folder(Path(workdir) / store.CAPTIONS_DIR, schemas.CAPTIONS, columns=["text"])
    descs = store.read_folder(Path(workdir) / store.DESCRIPTIONS_DIR, schemas.DESCRIPTIONS, columns=["text"])
    return [t for t in caps.column("text").to_pylist() + descs.column("text").to_pylist() if t]


def tiny_model_overrides(vision: Path, text: Path, image_size: int = 64, embed_dim: int = 32) -> dict[str, Any]:
    """LeccrConfig overrides for the tiny encoders (d and text_width are read from them)."""
    return {"vision_model": str(vision), "text_model": str(text), "image_size": image_size, "embed_dim": embed_dim}


# --------------------------------------------------------------------------- learning check

ABLATIONS = {
    # name: --ablate switches (leccr_core.config.ABLATIONS)
    "full": (),
    "no_softened_matching": ("softened",),
    "no_slots": ("slots",),
    "no_descriptions": ("descriptions",),
}


def chance_metrics(workdir: Path, split: str, lang: str = "de", trials: int = 500, seed: int = 0) -> dict:
    """Retrieval metrics under random scores, for the split's own caption -> item structure
    (items and their human `lang` captions, as evaluate reads them): {metric: sorted values of
    `trials` draws}. Thresholds set from its upper quantiles mean "better than chance" for the
    split as it is, whatever its size or captions per item."""
    import torch

    from leccr_core.metrics import retrieval_metrics
    from pipelines.train import build_eval_set, read_workdir, usable_items
    from collections import Counter
    manifest, captions, descriptions = read_workdir(Path(workdir), need_descriptions=False)
    items, _, _ = usable_items(manifest, descriptions, (), "image", Counter())
    evalset, _ = build_eval_set(items, captions, split, lang)
    caption_item = torch.tensor([c.item for c in evalset.captions])
    g = torch.Generator().manual_seed(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(trials):
        scores = torch.rand(len(caption_item), len(evalset.items), generator=g)
        for k, v in retrieval_metrics(scores, caption_item).items():
            draws.setdefault(k, []).append(v)
    return {k: sorted(v) for k, v in draws.items()}


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank)."""
    return values[min(len(values) - 1, int(q * len(values)))]


def learning_check(out: Path, ablations: Sequence[str] = ("full",), steps: int = 300, n_train: int = 400,
                   n_val: int = 50, n_test: int = 100, batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
                   num_workers: int = 0, threads: int | None = 1, progress: bool = False,
                   fusion_weights: Sequence[float] = (0.0, 0.1), train_seed: int = 42) -> dict:
    """Train each named variant on the synthetic workdir and evaluate on test (German
    text -> image). ``seed`` makes the data and the tiny encoders, ``train_seed`` the training
    (new layers' init, batch order, dropout). Returns {"chance_r1": ..., "runs": {name: {...}}}."""
    from leccr_core.train import TrainConfig
    from pipelines import evaluate as evaluate_stage
    from pipelines import train as train_stage

    out = Path(out)
    workdir = out / "workdir"
    if not (workdir / store.DESCRIPTIONS_DIR).is_dir():
        make_synthetic_workdir(workdir, n_train, n_val, n_test, seed=seed)
    vision, text = out / "encoders" / "vision", out / "encoders" / "text"
    if not (text / "vocab.txt").is_file():
        build_tiny_encoders(out / "encoders", workdir_texts(workdir), seed=seed)
    results: dict[str, Any] = {"chance_r1": 100.0 / n_test, "workdir": str(workdir), "runs": {}}
    for name in ablations:
        tc = TrainConfig(epochs=1000, max_steps=steps, batch_size=batch_size, lr=lr, num_workers=num_workers,
                         eval_every_steps=max(1, steps // 3), seed=train_seed, threads=threads)
        report = train_stage.run(train_stage.TrainStageConfig(
            workdir=workdir, lang="de", model=tiny_model_overrides(vision, text), train=tc,
            ablate=ABLATIONS[name], views=("detailed",), run_name=f"de-{name}-s{train_seed}", overwrite=True,
            progress=progress))
        run = {"train": report.summary}
        local = "slots" not in ABLATIONS[name] and "local" not in ABLATIONS[name]
        for w in (fusion_weights if name == "full" and local else (0.0,)):
            ev = evaluate_stage.run(evaluate_stage.EvaluateConfig(
                workdir=workdir, lang="de", checkpoint=Path(report.run_dir) / "best.pt", split="test",
                fusion_weight=w, num_workers=num_workers, name=f"de-{name}-s{train_seed}-test-w{w}",
                progress=progress))
            run[f"test_w{w}"] = ev.metrics
        results["runs"][name] = run
    return results


def format_results(results: dict) -> str:
    chance = results["chance_r1"]
    lines = [f"{'variant':38s} {'t2v R@1':>8s} {'x chance':>8s} {'t2v R@5':>8s} {'v2t R@1':>8s} {'R@sum':>8s}"]
    for name, run in results["runs"].items():
        for key, m in run.items():
            if not key.startswith("test_w"):
                continue
            label = f"{name} (fusion w={key[len('test_w'):]})"
            lines.append(f"{label:38s} {m['t2v_r1']:8.2f} {m['t2v_r1'] / chance:8.1f} {m['t2v_r5']:8.2f} "
                         f"{m['v2t_r1']:8.2f} {m['rsum']:8.2f}")
    lines.append(f"chance t2v R@1 = {chance:.2f}")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - by hand
    import typer
    app = typer.Typer(add_completion=False, no_args_is_help=True)

    @app.command()
    def make(workdir: Path = typer.Option(...), train: int = 400, val: int = 50, test: int = 100, seed: int = 0,
             encoders: Path | None = typer.Option(None, help="Also build tiny encoders here.")) -> None:
        """Write a synthetic German workdir (and optionally tiny encoders for it)."""
        report = make_synthetic_workdir(workdir, train, val, test, seed=seed)
        if encoders:
            build_tiny_encoders(encoders, workdir_texts(workdir), seed=seed)
        typer.echo(json.dumps({**report.__dict__, "workdir": str(report.workdir)}, indent=2))

    @app.command()
    def learn(out: Path = typer.Option(...), ablations: bool = typer.Option(False, help="Run every ablation."),
              steps: int = 300, train: int = 400, test: int = 100, lr: float = 5e-4, progress: bool = True) -> None:
        """Train tiny models on the synthetic data; print German text->image R@1 vs chance."""
        names = list(ABLATIONS) if ablations else ["full"]   # full, no softened, no slots, no descriptions
        results = learning_check(out, names, steps=steps, n_train=train, n_test=test, lr=lr, progress=progress)
        (Path(out) / "learning.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        typer.echo(format_results(results))

    app(argv)


if __name__ == "__main__":  # pragma: no cover
    _main()
