"""Ray plumbing shared by the stages: connecting (or starting a private local Ray) and
turning Ray's wrapped failures back into readable reasons."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from typing import Any, Mapping

from pipelines.engines.base import FatalEngineError


class RayUnreachableError(FatalEngineError):
    """The Ray cluster named by --ray-address / RAY_ADDRESS does not answer: nothing can run."""


# Ray kills a worker that has been idle for 1 s whenever its node runs more workers than it has
# CPUs. On a small machine the engine actor takes one of those, so the workers that prepare
# batches were killed in the gaps between batches and started again, about a CPU-second each
# (a 1536-image describe on 2 cores: 10-13 prepare workers instead of 4-5, the 5-view rate 98-125
# rows/s instead of 136; docs/benchmarks.md). A private cluster lives only as long as its run, so
# it keeps idle workers for a minute. (On a cluster of your own, set it at `ray start` with the
# environment variable RAY_idle_worker_killing_time_threshold_ms.)
# Its other settings spare the node's CPU, which it shares with the engine's scheduler (an idle
# private Ray with one actor: 4.3-4.8% of a core with the idle-worker setting alone, 3.4-3.7%
# with these): no idle workers started ahead of any task (describe's image batches load in the
# engine actor and need none; a task that does need one waits about a second for it), and no
# metrics or per-handler timing stats, which nothing reads without Ray's dashboard (not started
# here). Describe on Ray, device-bound, 1 view: 1.3 ms less host CPU per row (docs/benchmarks.md).
PRIVATE_CLUSTER_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000, "enable_worker_prestart": False,
                          "prestart_worker_first_driver": False, "enable_metrics_collection": False,
                          "event_stats": False}


def init_ray(address: str | None) -> Any:
    """Connect to the given Ray cluster (or RAY_ADDRESS), else start a private local one.

    Without an address Ray itself would join any cluster started on this machine with `ray
    start` (its temp folder's `ray_current_cluster` file) and hang on GCS time-outs when that
    cluster is dead: `address="local"` always starts our own. A named cluster that does not
    answer fails within seconds (RayUnreachableError) instead of hanging. Inside a Ray job Ray
    sets RAY_ADDRESS to the job's own cluster, so the stage runs there (tests/test_ray_jobs.py)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Read by Ray at import time. A private local cluster: token auth protects shared
        # clusters only, and its ports stay on loopback (else Ray listens on every interface).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    if ray.is_initialized():
        return ray
    if address:
        check_reachable(address)
    env = env_for_workers(os.environ)
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             logging_level=logging.WARNING, runtime_env={"env_vars": env} if env else None,
             _system_config=None if address else PRIVATE_CLUSTER_CONFIG)
    return ray


FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "OMP_", "TRANSFORMERS_")
# where the object store is (pipelines/storage.py); never its credentials, which a runtime env
# would show in Ray's dashboard and logs: each node takes those from its own environment or role
FORWARDED_ENV_NAMES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def env_for_workers(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's engine settings (VLLM_*, HF_*, ...) that the workers get too. Inside a Ray job
    (`ray job submit`, jobs/ray/) the job's runtime env already gives its env_vars to every
    worker, and ray.init refuses a runtime env that names any of them again: those are left out."""
    job_config = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")   # set by Ray's job supervisor
    job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in environ.items()
            if (k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV_NAMES) and k not in job_env}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to the cluster's GCS (for "auto": the address Ray would read from its
    temp folder), or RayUnreachableError naming the address. Ray Client (ray://) is left to Ray."""
    if address.startswith("ray://") or address == "local":
        return
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        try:
            target = canonicalize_bootstrap_address(address, None)
        except Exception as err:  # noqa: BLE001 - e.g. no running cluster recorded
            raise RayUnreachableError(f"--ray-address auto: no Ray cluster found on this machine ({err})") from None
    host, _, port = (target or "").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise RayUnreachableError(f"the Ray cluster at {address} does not answer ({target}: {err}); start it, "
                                  f"or leave --ray-address and RAY_ADDRESS unset for a private local Ray") from None


def root_cause(err: BaseException) -> str:
    """The readable reason inside a Ray-wrapped failure (e.g. an actor whose setup raised)."""
    seen = err
    while getattr(seen, "cause", None) is not None and seen.cause is not seen:
        seen = seen.cause
    text = str(seen)
    for line in reversed(text.splitlines()):
        if "FatalEngineError" in line or "Error:" in line:
            # our own errors' messages say it all: drop the class path Ray prints before them
            return re.sub(r"^pipelines(\.\w+)+Error: ", "", line.strip())
    return f"{type(seen).__name__}: {text[:2000]}"


def waiting_for(ray: Any) -> str:
    """What a stalled run waits for, for its error message: the resource demands Ray cannot
    place yet (e.g. "{'CPU': 4.0}: 1 pending") and the nodes lost. It reads the GCS's cluster
    status (the autoscaler's view), which needs no dashboard; never raises ("unknown")."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status
        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
        pending = [f"{dict(sorted(b.bundle.items()))}: {b.count} pending"
                   for demand in (*status.resource_demands.ray_task_actor_demand,
                                  *status.resource_demands.placement_group_demand)
                   for b in demand.bundles_by_count]
        demands = "; ".join(pending) or "none"
    except Exception as err:  # noqa: BLE001 - an internal API: a message must never fail
        demands = f"unknown ({type(err).__name__})"
    try:
        lost = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in ray.nodes() if not n["Alive"]]
        nodes = ", ".join(lost) or "none"
    except Exception as err:  # noqa: BLE001
        nodes = f"unknown ({type(err).__name__})"
    return f"pending resource demands: {demands}; nodes lost: {nodes}"
