"""In-process vLLM engine: one `vllm.LLM` per worker (one per GPU, or tensor-parallel)."""

from __future__ import annotations

from typing import Any

from pipelines.engines.base import (DescribeRequest, DescribeResult, EngineConfig, FatalEngineError,
                                    Stopwatch, chat_content, frames_of, require, uses_native_video)


def start_llm(vllm: Any, cfg: EngineConfig, **defaults: Any) -> tuple[Any, Any]:
    """Build `vllm.LLM` and its SamplingParams from an EngineConfig (shared by describe and
    translate). `defaults` are stage-specific LLM keywords; the user's engine_kwargs win."""
    kwargs: dict[str, Any] = {**defaults, "seed": cfg.sampling.seed}
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    kwargs.update(cfg.engine_kwargs)
    try:
        llm = vllm.LLM(model=cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                       tensor_parallel_size=cfg.tensor_parallel_size, **kwargs)
    except Exception as err:  # noqa: BLE001 - any start-up failure is fatal, with its reason
        raise FatalEngineError(f"vLLM could not start {cfg.model!r}: {type(err).__name__}: {err}") from err
    s = cfg.sampling
    params = vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed,
                                 repetition_penalty=s.repetition_penalty, ignore_eos=s.ignore_eos)
    return llm, params


def shutdown_llm(llm: Any) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


class VllmDescriber:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.llm: Any = None

    def setup(self) -> None:
        vllm = require("vllm", "vllm")
        transformers = require("transformers", "transformers")
        cfg = self.cfg
        model_config = transformers.AutoConfig.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        self.native_video = uses_native_video(cfg, getattr(model_config, "model_type", None))
        self.processor = transformers.AutoProcessor.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        limits = {"image": 1, "video": 1} if self.native_video else {"image": cfg.max_video_frames}
        self.llm, self.params = start_llm(vllm, cfg, limit_mm_per_prompt=limits)

    def close(self) -> None:
        shutdown_llm(self.llm)
        self.llm = None

    def _engine_input(self, request: DescribeRequest) -> dict:
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
        if inputs:
            for pos, result in zip(positions, self._generate(inputs)):
                results[pos] = result
        return [r for r in results if r is not None]

    def _generate(self, inputs: list[dict]) -> list[DescribeResult]:
        watch = Stopwatch()
        try:
            outputs = self.llm.generate(inputs, self.params, use_tqdm=False)
        except Exception as err:  # noqa: BLE001
            self._raise_if_dead(err)
            if len(inputs) == 1:
                return [DescribeResult.failed("invalid_request", f"{type(err).__name__}: {err}", watch.elapsed())]
            # vLLM rejects the whole batch for one invalid request: retry one by one to
            # isolate it; the engine stays healthy.
            return [result for single in inputs for result in self._generate([single])]
        share = watch.elapsed() / len(inputs)  # amortised: requests of a batch run together
        return [self._result(out, share) for out in outputs]

    @staticmethod
    def _result(output: Any, latency_s: float) -> DescribeResult:
        completion = output.outputs[0]
        return DescribeResult(text=completion.text, prompt_tokens=len(output.prompt_token_ids or []),
                              output_tokens=len(completion.token_ids), finish_reason=completion.finish_reason,
                              latency_s=latency_s)

    @staticmethod
    def _raise_if_dead(err: Exception) -> None:
        if type(err).__name__ == "EngineDeadError" or isinstance(err, MemoryError):
            raise FatalEngineError(f"the vLLM engine failed: {type(err).__name__}: {err}") from err
