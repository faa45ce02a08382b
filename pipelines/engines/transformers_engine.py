"""Fallback engine: transformers `generate`, one request at a time (simple and slow).

Use it where vLLM is not available for a model; its output follows the same contract.
"""

from __future__ import annotations

from typing import Any

from pipelines.engines.base import (DescribeRequest, DescribeResult, EngineConfig, FatalEngineError,
                                    Stopwatch, chat_content, frames_of, require, uses_native_video)


class TransformersDescriber:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def setup(self) -> None:
        torch = require("torch", "transformers")
        transformers = require("transformers", "transformers")
        cfg = self.cfg
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(
                cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
            ).to(device).eval()
        except Exception as err:  # noqa: BLE001 - a model that cannot load is fatal
            raise FatalEngineError(f"transformers could not load {cfg.model!r}: {type(err).__name__}: {err}") from err
        self.torch, self.device = torch, device
        self.native_video = uses_native_video(cfg, getattr(self.model.config, "model_type", None))

    def close(self) -> None:
        self.model = None

    def describe(self, requests: list[DescribeRequest]) -> list[DescribeResult]:
        return [self._describe_one(r) for r in requests]

    def _inputs(self, request: DescribeRequest) -> Any:
        frames = frames_of(request)
        content = chat_content(request.prompt, request.media_type, len(frames), self.native_video)
        text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        if request.media_type == "video" and self.native_video:
            media: dict[str, Any] = {"videos": [request.pixels]}
        else:
            media = {"images": frames}
        return self.processor(text=[text], return_tensors="pt", **media).to(self.device)

    def _describe_one(self, request: DescribeRequest) -> DescribeResult:
        s = self.cfg.sampling
        watch = Stopwatch()
        try:
            inputs = self._inputs(request)
            self.torch.manual_seed(s.seed)
            sample = s.temperature > 0
            kwargs = dict(max_new_tokens=s.max_tokens, do_sample=sample, repetition_penalty=s.repetition_penalty)
            if sample:
                kwargs.update(temperature=s.temperature, top_p=s.top_p)
            if s.ignore_eos:
                kwargs.update(min_new_tokens=s.max_tokens)
            with self.torch.inference_mode():
                out = self.model.generate(**inputs, **kwargs)
        except Exception as err:  # noqa: BLE001 - one bad request fails alone
            return DescribeResult.failed("invalid_request", f"{type(err).__name__}: {err}", watch.elapsed())
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = out[0, prompt_len:]
        text = self.processor.batch_decode([new_tokens], skip_special_tokens=True)[0]
        finish = "length" if len(new_tokens) >= s.max_tokens else "stop"
        return DescribeResult(text=text, prompt_tokens=int(prompt_len), output_tokens=int(len(new_tokens)),
                              finish_reason=finish, latency_s=watch.elapsed())
