"""Cost before you spend: `describe --dry-run` and `translate --dry-run` estimate prompt tokens
through the model's own processor/tokenizer from each item's real size, bound the output
tokens by max_tokens, and turn them into GPU-hours. The estimate is checked against what a
real run (transformers engines, tiny models, images and a video) then reports."""

from __future__ import annotations

import json

import pytest

from pipelines import cost
from tests.conftest import run_cli

pytestmark = pytest.mark.slow          # real engines run (transformers, tiny models): ~1 min


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sample_data):
    wd = tmp_path_factory.mktemp("cost") / "wd"
    done = run_cli("ingest", "--input", sample_data, "--workdir", wd, "--dataset", "sample")
    assert done.returncode == 0, done.stderr
    return wd


def _describe(workdir, model, *extra):
    return run_cli("describe", "--workdir", workdir, "--model", model, "--engine", "transformers", "--device", "cpu",
                   "--executor", "local", "--views", "objects,detailed", "--limit", "6", "--max-pixels", "50176",
                   "--video-frames", "4", "--no-progress", *extra)


def test_describe_dry_run_predicts_the_real_prompt_tokens(workdir, tiny_qwen, tmp_path):
    dry = _describe(workdir, tiny_qwen, "--max-tokens", "4", "--dry-run", "--tokens-per-s", "100",
                    "--report-json", tmp_path / "dry.json")
    assert dry.returncode == 0, dry.stderr
    estimate = json.loads((tmp_path / "dry.json").read_text())["cost"]
    assert not (workdir / "descriptions").exists()                      # nothing generated
    real = _describe(workdir, tiny_qwen, "--max-tokens", "4", "--report-json", tmp_path / "real.json")
    assert real.returncode == 0, real.stderr
    report = json.loads((tmp_path / "real.json").read_text())
    assert report["rows_written"] == 12 and report["error_rows"] == 0
    assert estimate["rows"] == 12 and estimate["measured"] == 6 and estimate["unreadable"] == 0
    assert estimate["prompt_tokens"] == report["prompt_tokens"]          # image grids and video frames alike
    per = estimate["prompt_tokens_per_row"]
    assert per["min"] < per["max"]                                       # sizes differ: so do the prompts
    assert estimate["output_tokens_max"] == 12 * 4 >= report["output_tokens"]
    assert estimate["tokens_per_s_source"] == "given" and estimate["parameters"] > 100_000
    expected_h = (estimate["output_tokens_max"] + estimate["prompt_tokens"] / cost.PREFILL_SPEEDUP) / 100 / 3600
    assert estimate["gpu_hours_max"] == pytest.approx(expected_h)
    assert "GPU-hours" in dry.stderr and "prompt tokens" in dry.stderr
    # a video costs more than an image at the same view: frames -> tokens
    bigger = _describe(workdir, tiny_qwen, "--max-tokens", "4", "--dry-run", "--video-frames", "8", "--report-json",
                       tmp_path / "dry8.json")
    assert bigger.returncode == 0, bigger.stderr
    assert json.loads((tmp_path / "dry8.json").read_text())["cost"]["prompt_tokens"] > estimate["prompt_tokens"]


def test_default_speed_comes_from_the_model_size(tiny_qwen, tmp_path):
    estimate = cost.CostEstimate(rows=10, prompt_tokens=1000, output_tokens_max=320)
    cost.gpu_time(estimate, str(tiny_qwen), None, None)
    assert 100_000 < estimate.parameters < 10_000_000                   # read from the safetensors headers
    assert estimate.tokens_per_s == cost.DEFAULT_TOKENS_PER_S[0][1]     # a tiny model: the smallest class
    assert "assumed default" in estimate.tokens_per_s_source
    assert estimate.gpu_hours_max == pytest.approx((320 + 1000 / cost.PREFILL_SPEEDUP) / estimate.tokens_per_s / 3600)
    unknown = cost.CostEstimate(rows=1)
    cost.gpu_time(unknown, str(tmp_path / "no-such-model"), None, None)  # no size, no figure: said, not guessed
    assert unknown.gpu_hours_max is None and "--tokens-per-s" in unknown.notes[0]
    bad = run_cli("describe", "--workdir", tmp_path, "--model", tiny_qwen, "--dry-run", "--tokens-per-s", "0")
    assert bad.returncode == 2 and "--tokens-per-s must be positive" in bad.stderr


def test_translate_dry_run_predicts_the_real_prompt_tokens(workdir, tmp_path):
    from pipelines.tiny_models import build_tiny_nllb
    nllb = build_tiny_nllb(tmp_path / "nllb")
    common = ["translate", "--workdir", workdir, "--to", "de", "--engine", "transformers", "--model", nllb,
              "--device", "cpu", "--executor", "local", "--max-tokens", "6", "--no-progress"]
    dry = run_cli(*common, "--dry-run", "--tokens-per-s", "50", "--report-json", tmp_path / "dry.json")
    assert dry.returncode == 0, dry.stderr
    estimate = json.loads((tmp_path / "dry.json").read_text())["cost"]
    real = run_cli(*common, "--report-json", tmp_path / "real.json")
    assert real.returncode == 0, real.stderr
    report = json.loads((tmp_path / "real.json").read_text())
    assert estimate["rows"] == report["engine_requests"] > 0             # distinct strings, after de-duplication
    assert estimate["prompt_tokens"] == report["prompt_tokens"]
    assert estimate["output_tokens_max"] == 6 * report["engine_requests"] >= report["output_tokens"]
    fast = run_cli("translate", "--workdir", workdir, "--to", "pt", "--dry-run", "--report-json", tmp_path / "f.json")
    assert fast.returncode == 0, fast.stderr
    cpu = json.loads((tmp_path / "f.json").read_text())["cost"]
    assert cpu["cpu_hours"] == pytest.approx(cpu["rows"] * cost.FAST_TRANSLATE_S_PER_REQUEST / 3600)
    assert cpu["gpu_hours_max"] is None and "CPU-hours" in fast.stderr
