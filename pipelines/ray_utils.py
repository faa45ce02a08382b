"""Ray plumbing shared by the stages: connecting (or starting a private local Ray) and
turning Ray's wrapped failures back into readable reasons."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


def init_ray(address: str | None) -> Any:
    """Connect to the given Ray cluster (or RAY_ADDRESS), else start a private local one."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Read by Ray at import time. A private local cluster: token auth protects shared
        # clusters only, and its ports stay on loopback (else Ray listens on every interface).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # before Ray Data first configures its loggers: keep its notices off the console
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    import ray
    if ray.is_initialized():
        return ray
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_", "OMP_", "TRANSFORMERS_"))}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             logging_level=logging.WARNING, runtime_env={"env_vars": env} if env else None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False       # our own bar reports rows, not Ray's operators
    ctx.print_on_execution_start = False
    return ray


def root_cause(err: BaseException) -> str:
    """The readable reason inside a Ray-wrapped failure (e.g. an actor whose setup raised)."""
    seen = err
    while getattr(seen, "cause", None) is not None and seen.cause is not seen:
        seen = seen.cause
    text = str(seen)
    for line in reversed(text.splitlines()):
        if "FatalEngineError" in line or "Error:" in line:
            return line.strip().removeprefix("pipelines.engines.base.FatalEngineError: ")
    return f"{type(seen).__name__}: {text[:2000]}"
