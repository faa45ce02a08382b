"""In-process vLLM engine: one AsyncLLM per worker (one per GPU, or tensor-parallel).

Every request is its own task on the worker's EngineLoop with its own future, resolved as soon
as it finishes; the runner keeps twice vLLM's max_num_seqs requests in flight per engine, so
the scheduler always has requests waiting instead of draining to the longest output of a
batch. A request vLLM rejects (e.g. a prompt longer than max_model_len) fails alone. An engine
that dies (EngineDeadError: its engine-core process is gone; MemoryError) is started again
once, and the requests that failed with it go to the new one; a second death stops the run.
`StreamingLLM` is shared by describe and translate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from concurrent.futures import Future
from typing import Any, Callable

from pipelines.engines.base import (DescribeRequest, DescribeResult, EngineConfig, EngineLoop, FatalEngineError,
                                    Stopwatch, chat_content, done_future, frames_of, require, uses_native_video)

# per worker: an engine that died once may have met bad luck (a killed process); twice stops the run
MAX_ENGINE_RESTARTS = 1
log = logging.getLogger(__name__)


def _engine_died(err: BaseException) -> bool:
    return type(err).__name__ == "EngineDeadError" or isinstance(err, MemoryError)


class StreamingLLM:
    """vLLM's AsyncLLM on an EngineLoop, built from an EngineConfig. `defaults` are
    stage-specific engine keywords; the user's engine_kwargs win."""

    def __init__(self, cfg: EngineConfig, **defaults: Any):
        self.cfg, self.defaults = cfg, defaults
        self.engine: Any = None
        self.loop: EngineLoop | None = None
        self._ids = (f"{uuid.uuid4().hex[:8]}-{n}" for n in itertools.count())
        self.restarts = 0
        self._restarting = asyncio.Lock()   # binds to the engine loop when first used

    def start(self) -> None:
        vllm = require("vllm", "vllm")
        self.loop = EngineLoop()
        s = self.cfg.sampling
        # FINAL_ONLY, as vLLM's offline LLM does: AsyncLLM's default (CUMULATIVE, for streaming
        # servers) builds an output for every running request at every step, which we never read
        from vllm.sampling_params import RequestOutputKind
        self.params = vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                          seed=s.seed, repetition_penalty=s.repetition_penalty,
                                          ignore_eos=s.ignore_eos, output_kind=RequestOutputKind.FINAL_ONLY)
        # built on the loop, so that the engine's output handler task lives there
        self.engine = self.loop.run(self._build())

    async def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        cfg = self.cfg
        kwargs: dict[str, Any] = {"disable_log_stats": True, **self.defaults, "seed": cfg.sampling.seed}
        if cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        kwargs.update(cfg.engine_kwargs)
        try:
            args = AsyncEngineArgs(model=cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                   tensor_parallel_size=cfg.tensor_parallel_size, **kwargs)
            # vLLM sizes its scheduler by usage context: AsyncLLM's own default (an engine
            # behind a server) gets max_num_seqs 128 and 2048 batched tokens, vLLM's offline
            # LLM class 256/4096 on CPU and 1024/16384 on an H100/H200. This is an offline
            # batch job: take the offline sizes, as one LLM.generate over everything would.
            return AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        except Exception as err:  # noqa: BLE001 - any start-up failure is fatal, with its reason
            raise FatalEngineError(f"vLLM could not start {cfg.model!r}: {type(err).__name__}: {err}") from err

    def in_flight(self) -> int:
        """Requests handed to the engine and not finished (waiting in vLLM's scheduler or running)."""
        return self.loop.pending if self.loop is not None else 0

    @property
    def max_num_seqs(self) -> int:
        """Sequences vLLM's scheduler runs at once."""
        return int(self.engine.vllm_config.scheduler_config.max_num_seqs)

    def submit(self, engine_input: Any, then: Callable[[DescribeResult], DescribeResult] | None = None) -> Future:
        """Start one request (a prompt string or prompt dict); the future resolves as soon as it
        finishes, after `then` (per-request post-processing) ran on its result."""
        assert self.loop is not None, "start() first"

        async def one() -> DescribeResult:
            result = await self.generate(engine_input)
            return then(result) if then else result
        return self.loop.submit(one())

    async def generate(self, engine_input: Any) -> DescribeResult:
        watch = Stopwatch()
        while True:
            engine, final = self.engine, None
            try:
                async for output in engine.generate(engine_input, self.params, request_id=next(self._ids)):
                    final = output
                break
            except Exception as err:  # noqa: BLE001
                if _engine_died(err):
                    await self._restart(engine, err)
                    continue       # the same request, on the new engine
                cause = err.__cause__ if type(err).__name__ == "EngineGenerateError" and err.__cause__ else err
                return DescribeResult.failed("invalid_request", f"{type(cause).__name__}: {cause}", watch.elapsed())
        if final is None:
            return DescribeResult.failed("bad_response", "vLLM finished the request without an output",
                                         watch.elapsed())
        completion = final.outputs[0]
        return DescribeResult(text=completion.text, prompt_tokens=len(final.prompt_token_ids or []),
                              output_tokens=len(completion.token_ids), finish_reason=completion.finish_reason,
                              latency_s=watch.elapsed())

    async def _restart(self, dead: Any, err: BaseException) -> None:
        """Replace a dead engine, once. Every request in flight fails with it at once: the first
        one here restarts it, the others find the new engine and go on; past the bound, every
        one of them raises FatalEngineError with the reason."""
        async with self._restarting:
            if self.engine is not dead:
                return
            reason = f"{type(err).__name__}: {err}"
            if self.restarts >= MAX_ENGINE_RESTARTS:
                raise FatalEngineError(f"the vLLM engine died again after {self.restarts} restart(s): {reason}") from err
            self.restarts += 1
            log.warning("the vLLM engine died (%s); starting it again", reason)
            try:
                dead.shutdown()
            except Exception:  # noqa: BLE001 - what is left of a dead engine may fail to stop
                pass
            self.engine = await self._build()

    def close(self) -> None:
        """Stop the engine's processes now rather than at interpreter exit."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None


class VllmDescriber:
    streaming = True

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.llm: StreamingLLM | None = None
        self.prompts: dict[tuple, str] = {}

    def setup(self) -> None:
        require("vllm", "vllm")
        transformers = require("transformers", "transformers")
        cfg = self.cfg
        model_config = transformers.AutoConfig.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        self.native_video = uses_native_video(cfg, getattr(model_config, "model_type", None))
        self.processor = transformers.AutoProcessor.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        limits = {"image": 1, "video": 1} if self.native_video else {"image": cfg.max_video_frames}
        self.llm = StreamingLLM(cfg, limit_mm_per_prompt=limits)
        self.llm.start()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def in_flight_target(self) -> int:
        assert self.llm is not None, "setup() first"
        return 2 * self.llm.max_num_seqs

    def in_flight(self) -> int:
        return self.llm.in_flight() if self.llm is not None else 0

    def _prompt(self, text: str, media_type: str, n_frames: int) -> str:
        """The chat-templated prompt; rendered once per (view, media shape), not per request."""
        key = (text, media_type, n_frames)
        if key not in self.prompts:
            # the media placeholder comes first, the prompt text after it: the views of one item
            # then share a prefix, which vLLM's prefix and multimodal caches reuse
            content = chat_content(text, media_type, n_frames, self.native_video)
            self.prompts[key] = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                                   add_generation_prompt=True, tokenize=False)
        return self.prompts[key]

    def _engine_input(self, request: DescribeRequest) -> dict:
        frames = frames_of(request)
        prompt = self._prompt(request.prompt, request.media_type, len(frames))
        if request.media_type == "video" and self.native_video:
            data: dict[str, Any] = {"video": request.pixels}          # (T, H, W, 3) uint8
        elif request.media_type == "video":
            data = {"image": frames}
        else:
            data = {"image": request.pixels}                         # (H, W, 3) uint8
        return {"prompt": prompt, "multi_modal_data": data}

    def submit(self, requests: list[DescribeRequest]) -> list[Future]:
        """One future per request, in order; a prompt the template rejects fails alone."""
        assert self.llm is not None, "setup() first"
        futures = []
        for request in requests:
            try:
                futures.append(self.llm.submit(self._engine_input(request)))
            except Exception as err:  # noqa: BLE001
                futures.append(done_future(DescribeResult.failed("invalid_request", f"{type(err).__name__}: {err}")))
        return futures

    def describe(self, requests: list[DescribeRequest]) -> list[DescribeResult]:
        return [future.result() for future in self.submit(requests)]
