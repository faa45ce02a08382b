"""Shared fixtures. Heavy fixtures (engines, servers, Ray) are session-scoped: each costs
tens of seconds to start on the 2-core CI machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipelines.cli"]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session", autouse=True)
def _vllm_cache(session_tmp):
    os.environ.setdefault("VLLM_CACHE_ROOT", str(session_tmp / "vllm-cache"))


@pytest.fixture(scope="session")
def sample_data(session_tmp) -> Path:
    from pipelines.sample_data import make_sample_dataset
    return make_sample_dataset(session_tmp / "sample", n_images=12, n_videos=3)


@pytest.fixture(scope="session")
def tiny_qwen(session_tmp) -> Path:
    from pipelines.tiny_models import build_tiny_qwen2_vl
    return build_tiny_qwen2_vl(session_tmp / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_llava(session_tmp) -> Path:
    from pipelines.tiny_models import build_tiny_llava
    return build_tiny_llava(session_tmp / "tiny-llava")


@pytest.fixture(scope="session")
def mixed_input(tmp_path_factory, sample_data) -> Path:
    """Sample images and videos, every bad input, a symlink out of the root, a non-UTF-8 name."""
    root = tmp_path_factory.mktemp("mixed")
    for sub in ("images", "videos"):
        for path in sorted((sample_data / sub).iterdir())[:4]:
            shutil.copy(path, root / path.name)
    from tests.bad_media import make_bad_media
    make_bad_media(root / "bad")
    outside = root.parent / "outside.jpg"
    shutil.copy(next((sample_data / "images").iterdir()), outside)
    os.symlink(outside, root / "bad" / "link_out.jpg")
    with open(os.fsencode(str(root)) + b"/caf\xe9.jpg", "wb") as fh:
        fh.write((sample_data / "images" / sorted(os.listdir(sample_data / "images"))[0]).read_bytes())
    return root
