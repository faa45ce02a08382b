"""The describer protocol shared by every MLLM backend, and the factory that picks one.

A describer is built once per worker (`setup()` loads the model or checks the endpoint) and
then answers batches: one result per request, in order, never raising for one bad request
(that becomes a result with `error_kind`). It raises `FatalEngineError` only when the engine
itself is unusable, which stops the run.

Streaming engines (vLLM's AsyncLLM, the OpenAI-compatible client) set `streaming = True`:
`submit(requests)` starts every request as its own task on one `EngineLoop` and returns one
future per request, so that each result can be handed on as soon as it is ready and many
batches, from many threads, share the engine at once; `in_flight_target()` says how many
requests keep the engine full. Batch engines (transformers) answer one call at a time.
`results_as_completed` gives a stage both kinds through one interface.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

ENGINES = ("vllm", "openai", "transformers")

# Model types whose processors take a video natively; every other model gets a video as a
# list of frames (images). An explicit table, not a guess from the model's name.
NATIVE_VIDEO_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next_video",
                                      "llava_onevision"})


class FatalEngineError(RuntimeError):
    """The engine cannot serve any request (bad model, dead engine, unreachable endpoint)."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False   # True gives a fixed output length (benchmarks)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineConfig:
    engine: str = "vllm"
    model: str = ""
    revision: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    video_input: str = "auto"              # auto | native | frames
    max_video_frames: int = 32             # per-prompt image limit in frames mode
    trust_remote_code: bool = False
    # vllm
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    # openai-compatible endpoint
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 3
    outage_timeout_s: float = 300.0        # how long an endpoint may fail everything before the run stops
    # transformers
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class DescribeRequest:
    prompt: str
    media_type: str            # image | video
    pixels: np.ndarray         # uint8 (H, W, 3) or (T, H, W, 3)


@dataclass
class DescribeResult:
    text: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    latency_s: float | None = None
    error_kind: str | None = None
    error: str | None = None

    @classmethod
    def failed(cls, kind: str, message: str, latency_s: float | None = None) -> "DescribeResult":
        return cls(error_kind=kind, error=message[:2000], latency_s=latency_s)


class Describer(Protocol):
    def setup(self) -> None: ...
    def describe(self, requests: list[DescribeRequest]) -> list[DescribeResult]: ...
    def close(self) -> None: ...


def make_describer(cfg: EngineConfig) -> Describer:
    """Build (not set up) the backend named by cfg.engine; heavy imports happen in setup()."""
    if cfg.engine == "vllm":
        from pipelines.engines.vllm_engine import VllmDescriber
        return VllmDescriber(cfg)
    if cfg.engine == "openai":
        from pipelines.engines.openai_engine import OpenAIDescriber
        return OpenAIDescriber(cfg)
    if cfg.engine == "transformers":
        from pipelines.engines.transformers_engine import TransformersDescriber
        return TransformersDescriber(cfg)
    raise ValueError(f"unknown engine {cfg.engine!r}; choose one of {', '.join(ENGINES)}")


def require(module: str, extra: str) -> Any:
    """Import an optional dependency or fail early with the install hint."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise FatalEngineError(f"the {module!r} package is needed here ({err}); "
                               f"install it with: pip install 'leccr-pipe[{extra}]'") from None


def uses_native_video(cfg: EngineConfig, model_type: str | None) -> bool:
    if cfg.video_input == "native":
        return True
    if cfg.video_input == "frames":
        return False
    return model_type in NATIVE_VIDEO_MODEL_TYPES


def chat_content(prompt: str, media_type: str, n_frames: int, native_video: bool) -> list[dict]:
    """Content parts of the one user turn: the media placeholders, then the prompt."""
    if media_type == "video" and native_video:
        parts = [{"type": "video"}]
    elif media_type == "video":
        parts = [{"type": "image"} for _ in range(n_frames)]
    else:
        parts = [{"type": "image"}]
    return parts + [{"type": "text", "text": prompt}]


def frames_of(request: DescribeRequest) -> list[np.ndarray]:
    return list(request.pixels) if request.media_type == "video" else [request.pixels]


class EngineLoop:
    """An asyncio loop on its own thread, on which a streaming engine runs all its requests.
    `run` may be called from many threads at once: their requests are in flight together."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.thread.start()
        self._started, self._finished = 0, 0
        self._counting = threading.Lock()      # batch threads submit at once; a cancel ends a future off the loop

    def run(self, coro: Any) -> Any:
        return self.submit(coro).result()

    def submit(self, coro: Any) -> Future:
        """Start a coroutine on the loop; its result or exception arrives in the future."""
        with self._counting:
            self._started += 1
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(self._count_finished)
        return future

    def _count_finished(self, _: Future) -> None:
        with self._counting:
            self._finished += 1

    @property
    def pending(self) -> int:
        """Coroutines started and not finished: a streaming engine's requests in flight."""
        return self._started - self._finished

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def done_future(result: Any) -> Future:
    """A future that is already resolved (a request that failed before it could be sent)."""
    future: Future = Future()
    future.set_result(result)
    return future


# Results finishing within this time after the first travel as one chunk, and on Ray an engine
# actor sends whatever chunks of all its batches arrived within this time as one object
# (runner.EngineWorker.events). Each chunk costs a writer call, each object a driver round trip.
# At 20 ms, with ten batches in flight at 5 views, a chunk held about one row: the Ray route (then
# one object per chunk) moved 130-133 rows/s, and 149-172 at 0.25 s (single runs,
# bench/describe.py, 2 cores). Much longer holds rows that the driver's window still counts as
# owed, so the engine gets new requests later (1 s: 156 rows/s).
LINGER_S = 0.25


def completed_in_chunks(futures: list[Future]) -> Iterator[list[int]]:
    """Indexes of the futures as they finish: each chunk is the first to finish plus whatever
    finished within LINGER_S after it, so a stage writes each result without waiting for its
    batch's slowest, and without a Ray object or a writer call per single result."""
    index = {future: i for i, future in enumerate(futures)}
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        if pending:
            more, pending = wait(pending, timeout=LINGER_S)
            done |= more
        yield sorted(index[future] for future in done)


def results_as_completed(engine: Any, requests: list, call: Callable[[list], list]) -> Iterator[list[tuple[int, Any]]]:
    """(request index, result) chunks in completion order: per request from a streaming engine
    (`engine.submit`), one chunk from a batch engine (`call`, e.g. engine.describe). A result
    count that breaks the engine contract stops the run rather than silently dropping rows."""
    if not requests:
        return
    if getattr(engine, "streaming", False):
        futures = engine.submit(requests)
        check_result_count(futures, requests)
        for chunk in completed_in_chunks(futures):
            yield [(i, futures[i].result()) for i in chunk]   # result() re-raises a fatal engine error
        return
    results = call(requests)
    check_result_count(results, requests)
    yield list(enumerate(results))


def check_result_count(results: list, requests: list) -> None:
    """A broken engine contract (a result missing or extra) stops the run instead of losing rows."""
    if len(results) != len(requests):
        raise FatalEngineError(f"the engine returned {len(results)} results for {len(requests)} requests")


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
