"""Which Ray a stage runs on (issue 8, in part): without an address a private local Ray, even
when Ray's temp folder still names a cluster that is gone; a named cluster that does not
answer fails within seconds with a message instead of hanging on GCS time-outs.

The describe runs use the openai engine against `ScriptedFakeEndpoint` (a scripted fake
endpoint that answers at once), so that only Ray is under test."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from tests.servers import ScriptedFakeEndpoint, free_port

LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _describe(sample_data: Path, workdir: Path, fake: ScriptedFakeEndpoint, *extra: str, env: dict):
    return run_cli("describe", "--input", sample_data, "--workdir", workdir, "--engine", "openai",
                   "--model", fake.model, "--base-url", fake.base_url, "--views", "detailed", "--no-progress",
                   *extra, timeout=300, env=env)


@pytest.mark.slow
def test_a_stale_current_cluster_file_does_not_stop_a_run_without_an_address(sample_data, tmp_path):
    # Ray's temp folder ($RAY_TMPDIR/ray; short: it holds unix sockets) names a cluster that is gone
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    env = {**LOOPBACK_RAY, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    try:
        with ScriptedFakeEndpoint() as fake:
            started = time.monotonic()
            done = _describe(sample_data, tmp_path / "w", fake, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert time.monotonic() - started < 240
        rows = pq.read_table(tmp_path / "w" / "descriptions").to_pylist()
        assert len(rows) == 15 and not any(r["error_kind"] for r in rows)
        assert list((ray_tmp / "ray").glob("session_*"))    # it started its own Ray there
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_named_cluster_that_does_not_answer_fails_at_once_with_its_address(sample_data, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    with ScriptedFakeEndpoint() as fake:
        started = time.monotonic()
        done = _describe(sample_data, tmp_path / "w", fake, "--ray-address", dead, env=LOOPBACK_RAY)
        elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert f"the Ray cluster at {dead} does not answer" in last_line
    assert elapsed < 60                               # seconds (CLI start-up included), not GCS time-outs
    assert not list((tmp_path / "w").glob("descriptions/*.parquet"))
