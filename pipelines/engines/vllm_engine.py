"""In-process vLLM engine: one AsyncLLM per worker (one per GPU, or tensor-parallel).

Every request is its own task on the worker's EngineLoop and returns as soon as it finishes;
the worker takes several batches at once (`concurrent_calls`), so vLLM's scheduler always has
requests waiting instead of draining to the longest output of each batch. A request vLLM
rejects (e.g. a prompt longer than max_model_len) fails alone; a dead engine stops the run.
`StreamingLLM` is shared by describe and translate.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from pipelines.engines.base import (DescribeRequest, DescribeResult, EngineConfig, EngineLoop, FatalEngineError,
                                    Stopwatch, chat_content, frames_of, require, uses_native_video)


class StreamingLLM:
    """vLLM's AsyncLLM on an EngineLoop, built from an EngineConfig. `defaults` are
    stage-specific engine keywords; the user's engine_kwargs win."""

    def __init__(self, cfg: EngineConfig, **defaults: Any):
        self.cfg, self.defaults = cfg, defaults
        self.engine: Any = None
        self.loop: EngineLoop | None = None
        self._ids = (f"{uuid.uuid4().hex[:8]}-{n}" for n in itertools.count())

    def start(self) -> None:
        vllm = require("vllm", "vllm")
        self.loop = EngineLoop()
        s = self.cfg.sampling
        self.params = vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                          seed=s.seed, repetition_penalty=s.repetition_penalty,
                                          ignore_eos=s.ignore_eos)
        # built on the loop, so that the engine's output handler task lives there
        self.engine = self.loop.run(self._build(vllm))

    async def _build(self, vllm: Any) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        cfg = self.cfg
        kwargs: dict[str, Any] = {"disable_log_stats": True, **self.defaults, "seed": cfg.sampling.seed}
        if cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        kwargs.update(cfg.engine_kwargs)
        try:
            args = AsyncEngineArgs(model=cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                   tensor_parallel_size=cfg.tensor_parallel_size, **kwargs)
            return AsyncLLM.from_engine_args(args)
        except Exception as err:  # noqa: BLE001 - any start-up failure is fatal, with its reason
            raise FatalEngineError(f"vLLM could not start {cfg.model!r}: {type(err).__name__}: {err}") from err

    def generate_all(self, inputs: list[Any]) -> list[DescribeResult]:
        """Run these requests (prompt strings or prompt dicts) and wait for all of them; other
        threads' requests run alongside on the same engine."""
        assert self.loop is not None, "start() first"
        return self.loop.gather([self.generate(one) for one in inputs])

    async def generate(self, engine_input: Any) -> DescribeResult:
        watch = Stopwatch()
        final = None
        try:
            async for output in self.engine.generate(engine_input, self.params, request_id=next(self._ids)):
                final = output
        except Exception as err:  # noqa: BLE001
            if type(err).__name__ == "EngineDeadError" or isinstance(err, MemoryError):
                raise FatalEngineError(f"the vLLM engine failed: {type(err).__name__}: {err}") from err
            cause = err.__cause__ if type(err).__name__ == "EngineGenerateError" and err.__cause__ else err
            return DescribeResult.failed("invalid_request", f"{type(cause).__name__}: {cause}", watch.elapsed())
        if final is None:
            return DescribeResult.failed("bad_response", "vLLM finished the request without an output",
                                         watch.elapsed())
        completion = final.outputs[0]
        return DescribeResult(text=completion.text, prompt_tokens=len(final.prompt_token_ids or []),
                              output_tokens=len(completion.token_ids), finish_reason=completion.finish_reason,
                              latency_s=watch.elapsed())

    def close(self) -> None:
        """Stop the engine's processes now rather than at interpreter exit."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None


class VllmDescriber:
    concurrent_calls = True

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.llm: StreamingLLM | None = None

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

    def _engine_input(self, request: DescribeRequest) -> dict:
        # the media placeholder comes first, the prompt text after it: the views of one item
        # then share a prefix, which vLLM's prefix and multimodal caches reuse
        frames = frames_of(request)
        content = chat_content(request.prompt, request.media_type, len(frames), self.native_video)
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True, tokenize=False)
        if request.media_type == "video" and self.native_video:
            data: dict[str, Any] = {"video": request.pixels}          # (T, H, W, 3) uint8
        elif request.media_type == "video":
            data = {"image": frames}
        else:
            data = {"image": request.pixels}                         # (H, W, 3) uint8
        return {"prompt": prompt, "multi_modal_data": data}

    def describe(self, requests: list[DescribeRequest]) -> list[DescribeResult]:
        results: list[DescribeResult | None] = [None] * len(requests)
        inputs, positions = [], []
        for i, request in enumerate(requests):
            try:
                inputs.append(self._engine_input(request))
                positions.append(i)
            except Exception as err:  # noqa: BLE001 - a prompt the template rejects fails alone
                results[i] = DescribeResult.failed("invalid_request", f"{type(err).__name__}: {err}")
        assert self.llm is not None, "setup() first"
        for pos, result in zip(positions, self.llm.generate_all(inputs) if inputs else []):
            results[pos] = result
        return [r for r in results if r is not None]
