"""How to feed vLLM continuously, measured without the pipeline around it: the stage's engine
(`StreamingLLM`: vLLM's AsyncLLM, a request per coroutine) against vLLM's other streaming API
(`LLMEngine.add_request` plus a `step()` loop) and against one `LLM.generate` over everything.

    .venv/bin/python bench/engine_loop.py [--captions 4000] [--images 1536] [--repeats 2]
        [--cases text,images,images-5views] [--routes baseline,asyncllm,step] [--device-bound] [--quick] [--no-docs]

The issue that asked for a streaming engine named both APIs; this is the measurement behind the
choice. The two streaming routes keep the same window as the stage (twice vLLM's max_num_seqs
requests in flight; a new one as soon as one finishes), in the process that also collects the
results, with nothing else running: no loading, no writing, no Ray. Inputs are ready before the
clock starts in all three routes. Cases: `text`, translate's prompts (bench/translate_vllm.py:
N distinct captions, tiny Qwen2 chat with EOS scaled, max_tokens 256); `images`, describe's
(bench/describe.py: N JPEGs loaded with `load_image` at <= 224*224, one view, tiny Qwen2-VL with
EOS scaled, max_tokens 256); `images-5views`, the same with the stage's five default views, an
image's views next to each other. Same model, prompts, greedy sampling, `enforce_eager`, vLLM's
offline scheduler sizes and log stats off in every route; each run in a fresh process. Rate: rows
over the time from the first request handed to vLLM to the last result (the whole generate()
call for the baseline). CPU per process over the same time: the front end (this process: input
processing, detokenizing, the route's loop), vLLM's EngineCore (scheduler; it polls while the
model runs, so it takes what the others leave) and the model worker. Greedy: every route must
produce the same output tokens.

Results: a table on stdout, the "engine loop" section of docs/benchmarks.md and the raw numbers in
<out>/engine-loop-results.json.
"""

from __future__ import annotations

import argparse
import itertools
import queue
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's packages

from bench import describe as describe_bench  # noqa: E402
from bench import translate_vllm  # noqa: E402
from bench.common import (DEVICE_BOUND_HELP, Timeline, add_run_args, finish,  # noqa: E402
                          lengths_cell, percentiles, pin_device_core, ratio_lines, ratios_to_baseline, results_header,
                          run_rounds, same_tokens, write_device_bound_section)
from bench.docs_section import replace_section  # noqa: E402
from bench.translate import specific_captions, write_lines  # noqa: E402

CASES = {"text": "text (translate's prompts)", "images": "images, 1 view (describe's prompts)",
         "images-5views": "images, 5 views (describe's default views)"}
ROUTES = ("baseline", "asyncllm", "step")
ROUTE_LABELS = {"baseline": "one `LLM.generate`", "asyncllm": "AsyncLLM, a window (the stage's `StreamingLLM`)",
                "step": "`LLMEngine.add_request` + `step()`, a window"}
MAX_TOKENS = 256
MAX_MODEL_LEN = 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=4000, help="distinct strings in the text case")
    parser.add_argument("--images", type=int, default=1536, help="JPEGs in the images case")
    parser.add_argument("--device-bound", action="store_true", help=DEVICE_BOUND_HELP)
    add_run_args(parser, CASES, ROUTES, ROOT / "bench" / "out")
    args = parser.parse_args()
    args.eos_norm = translate_vllm.EOS_NORM   # translate_vllm.model_for reads it
    if args.quick:   # a smoke run: a few minutes
        args.captions, args.images, args.cases, args.no_docs = 128, 64, "text,images,images-5views", True
    return args


# --------------------------------------------------------------------------- inputs

def inputs_for(args: argparse.Namespace) -> tuple[Path, list]:
    """The model and requests of a case, exactly as bench/translate_vllm.py and bench/describe.py
    build their baselines' requests."""
    if args.case == "text":
        model = translate_vllm.model_for(args, "variable")
        return model, translate_vllm.stage_prompts(args, model)
    model = describe_bench.build_model(args.out.resolve(), describe_bench.EOS_NORM, args.device_bound)
    images = sorted((args.out.resolve() / f"images-{args.images}").glob("*.jpg"))
    return model, describe_bench.image_requests(model, images, [v.prompt_for("image") for v in image_views(args.case)])


def image_views(case: str) -> tuple:
    """bench/describe.py's views: one detailed prompt, or the stage's five default views."""
    from pipelines.describe import DEFAULT_VIEWS, View
    return DEFAULT_VIEWS if case == "images-5views" else (View("detailed", describe_bench.PROMPT),)


# --------------------------------------------------------------------------- routes (child processes)

def engine_keywords(model: Path) -> dict:
    # log stats off (vLLM's default for LLM; the stage's too) in every route
    return {"model": str(model), "enforce_eager": True, "max_model_len": MAX_MODEL_LEN, "seed": 0,
            "disable_log_stats": True, "limit_mm_per_prompt": {"image": 1, "video": 1}}


def sampling(**extra):
    import vllm
    return vllm.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=0, **extra)


def run_baseline(model: Path, inputs: list) -> tuple[list[int], float, float, int | None]:
    import vllm
    llm = vllm.LLM(**engine_keywords(model))
    t0 = time.perf_counter()
    outputs = llm.generate(inputs, sampling(), use_tqdm=False)
    t1 = time.perf_counter()
    llm.llm_engine.engine_core.shutdown()
    return [len(o.outputs[0].token_ids) for o in outputs], t0, t1, None


def run_asyncllm(model: Path, inputs: list) -> tuple[list[int], float, float, int | None]:
    """The stage's engine, fed as its runner feeds it: a window of requests, refilled as each finishes."""
    from pipelines.engines.base import EngineConfig, SamplingConfig
    from pipelines.engines.vllm_engine import StreamingLLM
    keywords = engine_keywords(model)
    cfg = EngineConfig(engine="vllm", model=keywords.pop("model"), max_model_len=keywords.pop("max_model_len"),
                       sampling=SamplingConfig(max_tokens=MAX_TOKENS), engine_kwargs=keywords)
    llm = StreamingLLM(cfg)
    llm.start()
    window, lengths = 2 * llm.max_num_seqs, []
    pending, finished = iter(inputs), queue.SimpleQueue()

    def submit(engine_input) -> None:
        llm.submit(engine_input).add_done_callback(finished.put)

    t0 = time.perf_counter()
    for engine_input in itertools.islice(pending, window):
        submit(engine_input)
    for _ in inputs:
        lengths.append(finished.get().result().output_tokens)
        for engine_input in itertools.islice(pending, 1):
            submit(engine_input)
    t1 = time.perf_counter()
    llm.close()
    return lengths, t0, t1, window


def run_step(model: Path, inputs: list) -> tuple[list[int], float, float, int | None]:
    """vLLM's synchronous engine (what LLM.generate drives), fed through the same window: add
    requests until the window is full, step, and add one for each that finished."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(**engine_keywords(model)), usage_context=UsageContext.LLM_CLASS)
    params = sampling(output_kind=RequestOutputKind.FINAL_ONLY)
    window = 2 * engine.vllm_config.scheduler_config.max_num_seqs
    pending, lengths, live = enumerate(inputs), [], 0
    t0 = time.perf_counter()
    while True:
        for number, engine_input in itertools.islice(pending, window - live):
            engine.add_request(str(number), engine_input, params)
            live += 1
        if not live:
            break
        for output in engine.step():
            if output.finished:
                live -= 1
                lengths.append(len(output.outputs[0].token_ids))
    t1 = time.perf_counter()
    engine.engine_core.shutdown()
    return lengths, t0, t1, window


ROUTE_RUNNERS = {"baseline": run_baseline, "asyncllm": run_asyncllm, "step": run_step}


def child_main(args: argparse.Namespace) -> None:
    import json
    pinned = pin_device_core() if args.device_bound else {}   # first: vLLM inherits it
    model, inputs = inputs_for(args)
    with Timeline() as timeline:
        lengths, t0, t1, window = ROUTE_RUNNERS[args.child](model, inputs)
    if len(lengths) != len(inputs):
        raise RuntimeError(f"{args.child}: {len(lengths)} results for {len(inputs)} requests")
    cpu = timeline.window(t0, t1)
    dt = cpu["window_s"]
    engine_core = cpu["engine_cpu_s"] / dt - cpu["model_worker_cores"]
    result = {"route": args.child, "case": args.case, "rows": len(lengths), "wall_s": t1 - t0,
              "rows_per_s": len(lengths) / (t1 - t0), "window": window, "lengths": percentiles(lengths),
              "front_end_cores": cpu["own_cpu_cores"] - cpu["engine_cpu_s"] / dt, "engine_core_cores": engine_core,
              "model_worker_cores": cpu["model_worker_cores"], "foreign_cpu_share": cpu["foreign_cpu_share"], **pinned}
    args.child_out.write_text(json.dumps(result) + "\n")


# --------------------------------------------------------------------------- parent

def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; vllm {results['versions']['vllm']}; code measured: "
             f"{results.get('label') or '-'}. {results['captions']} distinct captions (text) and {results['images']} "
             f"JPEGs (images: 1 view; images-5views: the stage's 5 default views); tiny models with random weights and EOS scaled (variable lengths), greedy, "
             f"max_tokens {MAX_TOKENS}, `enforce_eager`, log stats off, each run in a fresh process; inputs ready "
             f"before the clock. Rows/s: rows over the time from the first request to the last result. CPU in "
             f"cores over that time: the front end (the route's own process), vLLM's EngineCore and its model "
             f"worker. Command: `{results['command']}`.", "",
             "| case | round | route | window | requests | output tokens p10 / p50 / p90 / max (total) | others' CPU "
             "| front end | EngineCore | model worker | rows/s | route/baseline |", "|" + "---|" * 12]
    for run in results["runs"]:
        ratio = f"**{run['ratio']:.2f}**" if "ratio" in run else ""
        lines.append(f"| {CASES[run['case']]} | {run['round']} | {ROUTE_LABELS[run['route']]} | "
                     f"{run['window'] or 'all'} | {run['rows']} | {lengths_cell(run['lengths'])} | "
                     f"{run['foreign_cpu_share']:.0%} | {run['front_end_cores']:.2f} | {run['engine_core_cores']:.2f} | "
                     f"{run['model_worker_cores']:.2f} | {run['rows_per_s']:.1f} | {ratio} |")
    lines += ratio_lines(results, CASES, ROUTE_LABELS, title="Median route/baseline")
    return "\n".join(lines) + "\n"


def progress(run: dict) -> str:
    return (f"{run['rows']} rows, {run['rows_per_s']:.1f} rows/s, front end {run['front_end_cores']:.2f} cores, "
            f"others' CPU {run['foreign_cpu_share']:.0%}")


def update_docs(section: str) -> None:
    replace_section("engine_loop.py", "## describe and translate: feeding vLLM (AsyncLLM, step loop, one generate)\n\n"
                    f"_Written by `bench/engine_loop.py`._\n\n{section}", before="<!-- bench/ceiling.py: begin -->")


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    out = args.out.resolve()
    cases = args.cases.split(",")
    if "text" in cases:
        write_lines(translate_vllm.captions_file(args), specific_captions(args.captions))
        translate_vllm.model_for(args, "variable")   # built once here, not in two children at once
    if "images" in cases or "images-5views" in cases:
        describe_bench.make_images(out / f"images-{args.images}", args.images)
        describe_bench.build_model(out, describe_bench.EOS_NORM, args.device_bound)
    results = results_header("bench/engine_loop.py", args, captions=args.captions, images=args.images,
                             device_bound=args.device_bound)
    child_args = ["--captions", str(args.captions), "--images", str(args.images), "--out", str(out),
                  *(["--device-bound"] if args.device_bound else [])]
    json_path = out / "engine-loop-results.json"
    run_rounds(args, Path(__file__).resolve(), results, json_path, child_args, progress)
    results["summary"], results["same_tokens"] = ratios_to_baseline(results["runs"]), same_tokens(results["runs"])
    finish(results, json_path, markdown(results),
           partial(write_device_bound_section, "engine_loop.py", "describe and translate: feeding vLLM")
           if args.device_bound else update_docs, args.no_docs)


if __name__ == "__main__":  # vLLM starts its engine process with spawn: it re-imports this file
    main()
