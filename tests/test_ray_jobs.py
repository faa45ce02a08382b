"""Ray Jobs (issue 11, in part): `leccr-pipe describe` submitted with `ray job submit` to a REAL
local Ray head with its dashboard (Ray's jobs server), through jobs/ray/submit_describe.sh and
jobs/ray/runtime_env.yaml exactly as a user runs them (the checkout shipped as working_dir).

The stage uses the openai engine against `ScriptedFakeEndpoint` (a scripted fake endpoint that
answers at once), so that no model is needed and Ray Jobs is what is under test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

import schemas
from pipelines import store
from pipelines.ray_utils import env_for_workers
from tests.conftest import ROOT
from tests.servers import ScriptedFakeEndpoint, free_port, log_tail, start_ray_node, stop_ray_node

HEAD_START_TIMEOUT_S = float(os.environ.get("LECCR_TEST_RAY_HEAD_TIMEOUT_S", "180"))


def _jobs_server_answers(dashboard_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextmanager
def ray_head_with_dashboard(folder: Path) -> Iterator[str]:
    """`ray start --head --block` with its dashboard, all on loopback, in a session of its own;
    yields the dashboard URL once the jobs server answers. On exit the cluster is stopped through
    the ids of the processes this started (never `ray stop`: it ends every Ray on the machine)."""
    # A short private temp folder (Ray's unix sockets live there) that no other cluster uses.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayj", dir="/tmp"))
    dashboard_port = free_port()
    args = ["--head", f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            "--num-cpus=2", f"--temp-dir={ray_tmp}",
            # ports with fixed defaults, which another cluster on this machine may hold
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log_path = folder / "ray-head.log"
    head = start_ray_node(args, env, log_path)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not _jobs_server_answers(url):
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with code {head.returncode}; {log_path}:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray's jobs server at {url} did not answer within {HEAD_START_TIMEOUT_S:.0f} s; "
                                   f"{log_path}:\n{log_tail(log_path)}")
            time.sleep(1)
        yield url
    finally:
        stop_ray_node(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_describe_as_a_ray_job_runs_on_the_cluster_and_writes_every_row_once(sample_data, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    workdir = tmp_path / "w"
    with ray_head_with_dashboard(tmp_path) as dashboard, ScriptedFakeEndpoint() as fake:
        submitted = subprocess.run(
            ["bash", "jobs/ray/submit_describe.sh", "--input", str(sample_data), "--workdir", str(workdir),
             "--engine", "openai", "--model", fake.model, "--base-url", fake.base_url, "--views", "detailed",
             "--no-progress"],
            cwd=ROOT, capture_output=True, text=True, timeout=480,
            # the venv's `ray` for the script, and the venv's Python for the job's driver
            env={**os.environ, "RAY_ADDRESS": dashboard, "JOB_PYTHON": sys.executable,
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        output = (submitted.stdout + submitted.stderr)[-4000:]
        assert submitted.returncode == 0, output
        jobs = JobSubmissionClient(dashboard).list_jobs()
        assert [job.status for job in jobs] == [JobStatus.SUCCEEDED], output
        # The job's driver joined THIS cluster (not a private Ray of its own): the engine actor
        # ran here, under the job's id.
        engines = list_actors(address=dashboard, filters=[("class_name", "=", "EngineWorker")],
                              raise_on_missing_output=False)
        assert [a.job_id for a in engines] == [jobs[0].job_id], engines
        assert fake.attempts() == 15

    manifest = store.read_folder(workdir / "manifest", schemas.MANIFEST, columns=["item_id"])
    rows = store.read_folder(workdir / "descriptions", schemas.DESCRIPTIONS, all_attempts=True).to_pylist()
    assert manifest.num_rows == 15
    assert sorted((r["item_id"], r["view"]) for r in rows) == sorted(
        (item, "detailed") for item in manifest.column("item_id").to_pylist())
    assert not [r for r in rows if r["error_kind"]]


def test_inside_a_ray_job_the_jobs_own_env_vars_are_not_forwarded_again():
    # ray.init in a job's driver refuses a runtime env that names one of the job's env_vars again
    job_config = json.dumps({"runtime_env": {"env_vars": {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}}})
    environ = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "VLLM_CPU_KVCACHE_SPACE": "1", "PATH": "/bin"}
    assert env_for_workers(environ) == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert env_for_workers({**environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": job_config}) == {"VLLM_CPU_KVCACHE_SPACE": "1"}
