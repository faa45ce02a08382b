"""Describe on a REAL local multi-node Ray cluster (issue 8): a head and two workers started by
the test with `ray start` on loopback, each in its own process group, stopped through those
groups (never `ray stop`: the machine is shared). The engine is the openai client against
`ScriptedFakeEndpoint` (a scripted fake endpoint: every request sleeps a little, so a run lasts
long enough to kill a node in the middle), so that only Ray is under test.

- A worker node killed with SIGKILL mid-run (the one holding the engine actor, and load tasks
  and prepared batches): the run replaces the actor on the other worker and ends with every
  (item, view) exactly once.
- A starved cluster (the engine actor asks for more CPUs than any node has): the run exits 1
  within --stall-timeout plus a margin, naming the pending demand.

Placement: the head has 1 CPU (the driver's node), each worker 3; the engine actor asks for 2
(--engine-num-cpus), so it can only run on a worker, and either worker can take it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import CLI, ROOT
from tests.servers import ScriptedFakeEndpoint, free_port, log_tail, sleep_then, start_ray_node, stop_ray_node

pytestmark = pytest.mark.slow

ITEMS = 40
STALL_TIMEOUT_S = 20


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    head: subprocess.Popen
    workers: list[subprocess.Popen]


def _alive_nodes(address: str) -> int:
    from ray.autoscaler.v2.sdk import get_cluster_status
    status = get_cluster_status(address, timeout=5)
    return len(status.active_nodes) + len(status.idle_nodes)


@pytest.fixture(scope="module")
def ray_cluster():
    # Ray's temp folder holds unix sockets: a short path. The cluster variable must not be 0
    # (pipelines.ray_utils sets it to 0 for a private Ray in this process), or workers refuse to join.
    tmp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(start_ray_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"], env,
                                 tmp / "head.log"))
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert nodes[0].poll() is None and time.monotonic() < deadline, log_tail(tmp / "head.log")
            time.sleep(0.2)
        # one worker at a time: `ray start` gives a raylet 30 s to register, which three nodes
        # starting at once on 2 busy cores can miss; a worker that missed it gets one more try
        for i in range(2):
            for attempt in range(2):
                log = tmp / f"worker{i}-{attempt}.log"
                nodes.append(start_ray_node([f"--address={address}", "--num-cpus=3"], env, log))
                while _alive_nodes(address) < i + 2 and nodes[-1].poll() is None:
                    assert time.monotonic() < deadline + 120, f"worker {i} did not join: {log_tail(log)}"
                    time.sleep(0.5)
                if nodes[-1].poll() is None:
                    break
                stop_ray_node(nodes.pop())
                assert attempt == 0, f"worker {i} did not start twice: {log_tail(log)}"
        yield Cluster(address, env, nodes[0], nodes[1:])
    finally:
        for node in reversed(nodes):     # only the process groups this fixture started
            stop_ray_node(node)
        shutil.rmtree(tmp, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(ITEMS):
        Image.new("RGB", (32, 24), (i * 6, 255 - i * 6, (i * 37) % 256)).save(folder / f"img{i:03d}.png")
    return folder


def _describe(cluster: Cluster, images: Path, workdir: Path, fake: ScriptedFakeEndpoint, *extra: str,
              engine_cpus: int = 2):
    cmd = [*CLI, "describe", "--input", images, "--workdir", workdir, "--engine", "openai", "--model", fake.model,
           "--base-url", fake.base_url, "--views", "detailed", "--no-progress", "--ray-address", cluster.address,
           "--engine-num-cpus", engine_cpus, "--batch-size", "4", "--concurrency", "2", "--rows-per-file", "1", *extra]
    return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _engine_node(cluster: Cluster) -> subprocess.Popen | None:
    """The worker whose process tree holds the engine actor (Ray titles it ray::EngineWorker)."""
    for node in cluster.workers:
        for proc in psutil.Process(node.pid).children(recursive=True):
            try:
                if "EngineWorker" in " ".join(proc.cmdline()):
                    return node
            except psutil.Error:
                pass
    return None


def test_a_worker_node_killed_mid_run_loses_no_row_and_repeats_none(ray_cluster, tmp_path):
    workdir = tmp_path / "w"
    with ScriptedFakeEndpoint(default=sleep_then(0.3)) as fake:
        run = _describe(ray_cluster, _images(tmp_path / "images"), workdir, fake, "--stall-timeout", "300")
        try:
            deadline, victim = time.monotonic() + 240, None
            while victim is None:
                assert run.poll() is None, run.communicate()[1][-4000:]
                assert time.monotonic() < deadline, "no rows written within 240 s"
                time.sleep(0.1)
                if len(list(workdir.glob("descriptions/*.parquet"))) >= 6:
                    victim = _engine_node(ray_cluster)
            os.killpg(victim.pid, signal.SIGKILL)     # the raylet, the engine actor and every task of that node
            victim.wait(timeout=30)
            written_at_kill = len(list(workdir.glob("descriptions/*.parquet")))
            out, err = run.communicate(timeout=400)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 0, err[-4000:]
    assert written_at_kill < ITEMS                               # the node died mid-run
    rows = pq.read_table(workdir / "descriptions").to_pylist()
    assert len(rows) == ITEMS and len({(r["item_id"], r["view"]) for r in rows}) == ITEMS
    assert not [r for r in rows if r["error_kind"] or not r["text"]]
    survivor = next(node for node in ray_cluster.workers if node is not victim)
    assert survivor.poll() is None                               # the run went on there


def test_a_starved_cluster_stops_with_the_stall_message_within_the_timeout(ray_cluster, tmp_path):
    with ScriptedFakeEndpoint() as fake:
        started = time.monotonic()
        run = _describe(ray_cluster, _images(tmp_path / "images"), tmp_path / "w", fake,
                        "--stall-timeout", STALL_TIMEOUT_S, engine_cpus=8)
        try:
            _, err = run.communicate(timeout=STALL_TIMEOUT_S + 120)
        finally:
            if run.poll() is None:
                run.kill()
        elapsed = time.monotonic() - started
    assert run.returncode == 1, err[-4000:]
    last_line = err.strip().splitlines()[-1]
    assert f"stalled: no rows finished for {STALL_TIMEOUT_S} s while up to {ITEMS} rows are still owed" in last_line
    assert "pending resource demands: {'CPU': 8.0}: 1 pending" in last_line, last_line
    assert "engine actors up: 0 of 1" in last_line and "raise --stall-timeout" in last_line
    assert STALL_TIMEOUT_S <= elapsed < STALL_TIMEOUT_S + 60      # CLI start-up and connecting included
    assert not fake.requests                                     # no engine ever ran
