"""Is a model at hand? A local folder, a hub id in the Hugging Face cache, or a hub id the hub
answers for now. Asked before anything loads, so that an unreachable hub costs one short probe
instead of transformers' half a minute of retries (no network on the project's machines)."""

from __future__ import annotations

import os
from pathlib import Path

HUB_PROBE_TIMEOUT_S = 3.0


def looks_like_path(name: str) -> bool:
    """A name that can only be a folder (hub ids are `name` or `owner/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def unavailable(name: str) -> str | None:
    """None when `name` can be loaded here; else why not, in words."""
    if Path(name).expanduser().is_dir():
        return None
    if looks_like_path(name):
        return "no such model folder"
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        return "not a local folder and not in the Hugging Face cache, and the hub is switched off (HF_HUB_OFFLINE)"
    import httpx
    try:
        status = httpx.head(f"{constants.ENDPOINT}/api/models/{name}", timeout=HUB_PROBE_TIMEOUT_S,
                            follow_redirects=True).status_code
    except httpx.HTTPError as err:
        return (f"not a local folder and not in the Hugging Face cache, and the hub cannot be reached "
                f"({constants.ENDPOINT}: {type(err).__name__})")
    if status == 404:
        return f"not a local folder, not in the Hugging Face cache, and the hub has no model {name!r}"
    return None
