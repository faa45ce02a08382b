"""Benchmark of the describe stage's openai engine against a plain asyncio/httpx client, both
sending the same requests to ONE real vLLM OpenAI-compatible server on loopback.

    .venv/bin/python bench/describe_openai.py [--images 512] [--concurrency 32] [--repeats 1]
        [--cases 1view,5views] [--routes baseline,stage,stage-engine,stage-local] [--eos-norm 0.6]
        [--quick] [--no-docs]

The server (`python -m vllm.entrypoints.openai.api_server`, tests/servers.py) serves the tiny
Qwen2-VL whose EOS lm_head row is scaled (bench/describe.py `build_model`): greedy captions of
input-dependent length, max_tokens 256. Its prefix and multimodal caches are reset before each
run, so no route profits from the previous one's work.

Routes, each in a fresh process, alternated per repeat so drift on the machine hits them all:
- baseline: the client a user would write (bench/common.py `plain_client_run`): asyncio +
  httpx.AsyncClient, a semaphore of C, one chat request per (image, view): the image as the
  JPEG data URL the stage sends (pixels from `load_image`, JPEG q95, base64, encoded before the
  clock), then the view's prompt; timed from the first send to the last answer.
- stage: `describe.run(engine="openai", concurrency=C)` on a private local Ray, as a user runs it
  (media loaded on Ray tasks, `--load-on auto`); stage-engine: the same with `--load-on engine`
  (media loaded in the engine actor); stage-local: the same with executor="local". Steady rows/s
  after the first results (`report.rows_per_s`).
The ratio is taken like for like, from outside both routes: rows over the span in which the server
had requests (its /metrics, polled every 0.2 s: from the first request seen to the last one gone),
which excludes the stage's start-up and needs no timer inside the stage. The stage's own steady
rate (`report.rows_per_s`, after its first results) against the baseline's rate counted the same
way (after as many answers as the stage's first results) is shown in brackets. Sanity: greedy, so every route
must produce the same total of output tokens.

Results: a markdown table on stdout, the "describe: openai engine" section of docs/benchmarks.md
and the raw numbers in <out>/describe-openai-results.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's packages

from bench.common import (DESCRIBE_ROUTE_LABELS, DESCRIBE_ROUTES, Timeline, add_run_args, finish,  # noqa: E402
                          lengths_cell, percentiles, plain_client_run, ratio_lines, ratios_to_baseline,
                          results_header, run_rounds, same_tokens, steady_as_stage)
from bench.describe import EOS_NORM, MAX_TOKENS, PROMPT, STAGE_MEDIA, build_model, make_images  # noqa: E402
from bench.docs_section import replace_section  # noqa: E402

CASES = {"1view": "1 view", "5views": "5 views (stage default)"}
ROUTES = ("baseline", "stage", "stage-engine", "stage-local")
ROUTE_LABELS = {"baseline": "plain httpx client", **DESCRIBE_ROUTE_LABELS}
JPEG_QUALITY = 95   # what the openai engine sends (pipelines/engines/openai_engine.py)


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """Size options and the hidden endpoint options of a child (shared with bench/ceiling.py)."""
    parser.add_argument("--images", type=int, default=512, help="COCO-sized JPEGs (>= 500 for the issue's numbers)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight, every route (C)")
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_endpoint_args(parser)
    parser.add_argument("--eos-norm", type=float, default=EOS_NORM)
    add_run_args(parser, CASES, ROUTES, ROOT / "bench" / "out")
    args = parser.parse_args()
    if args.quick:   # a smoke run: a few minutes
        args.images, args.cases, args.no_docs = 64, "1view", True
    return args


def views_of(case: str) -> tuple:
    from pipelines.describe import DEFAULT_VIEWS, View
    return (View("detailed", PROMPT),) if case == "1view" else DEFAULT_VIEWS


# --------------------------------------------------------------------------- routes (child processes)

def jpeg_data_url(pixels) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_payloads(model: str, images: list[Path], prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[dict]:
    """One chat request per (image, prompt), an image's prompts next to each other (the stage's
    order); each image loaded and encoded once; the image part before the text (prefix cache)."""
    from pipelines.media import load_image
    payloads = []
    for path in images:
        url = jpeg_data_url(load_image(path, STAGE_MEDIA).pixels)
        for prompt in prompts:
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
            payloads.append({"model": model, "messages": [{"role": "user", "content": content}],
                             "temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens, "seed": 0})
    return payloads


def run_baseline(args: argparse.Namespace, image_dir: Path) -> dict:
    prompts = [v.prompt_for("image") for v in views_of(args.case)]
    payloads = chat_payloads(args.model, sorted(image_dir.glob("*.jpg")), prompts)   # before the clock
    with Timeline(args.server_pid) as timeline, BusySpan(args.base_url.removesuffix("/v1")) as busy:
        result = plain_client_run(args.base_url, payloads, args.concurrency)
    result.update(concurrency=args.concurrency, **busy.summary(result["rows"]), **timeline.window(*busy.span()))
    return result


def run_stage(args: argparse.Namespace, image_dir: Path, workdir: Path, route: str, span_class=None) -> dict:
    """`describe.run` with the openai engine as a user calls it. Rows/s and CPU over the span in
    which the server was busy (`span_class`, default BusySpan); the report's own steady rate
    too. Shared with bench/ceiling.py (which passes the instant endpoint's span)."""
    import shutil

    import pyarrow.parquet as pq

    from pipelines import describe
    from pipelines.engines.base import EngineConfig, SamplingConfig
    from pipelines.ingest import IngestConfig

    shutil.rmtree(workdir, ignore_errors=True)
    views = views_of(args.case)
    executor, load_on = DESCRIBE_ROUTES[route]
    engine = EngineConfig(engine="openai", model=args.model, base_url=args.base_url, concurrency=args.concurrency,
                          timeout_s=600.0, sampling=SamplingConfig(max_tokens=MAX_TOKENS))
    cfg = describe.DescribeConfig(workdir=workdir, engine=engine, views=views, media=STAGE_MEDIA, executor=executor,
                                  load_on=load_on, ingest=IngestConfig(input=image_dir, workdir=workdir),
                                  progress=False)
    span_class = span_class or BusySpan
    with Timeline(args.server_pid) as timeline, span_class(args.base_url.removesuffix("/v1")) as busy:
        t0 = time.perf_counter()
        report = describe.run(cfg)
    table = pq.read_table(workdir / "descriptions")
    expected = args.images * len(views)
    if table.num_rows != expected or report.error_rows:
        raise RuntimeError(f"stage output: {table.num_rows} rows (expected {expected}), {report.error_rows} errors")
    whole = timeline.window(t0, t0 + report.wall_s)
    return {"route": route, "executor": executor, "load_on": load_on,
            "rows": report.rows_written, "rows_per_s": report.rows_per_s, "wall_s": report.wall_s,
            "startup_s": report.startup_s, "first_batch_rows": report.first_batch_rows,
            "concurrency": args.concurrency, "lengths": percentiles(table.column("output_tokens").to_pylist()),
            **busy.summary(report.rows_written), **timeline.window(*busy.span()),
            "whole_run": {"own_cpu_s": whole.get("own_cpu_s"), "rows_per_cpu_s":
                          report.rows_written / whole["own_cpu_s"] if whole.get("own_cpu_s") else None}}


def child_main(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    image_dir = out / f"images-{args.images}"
    if args.child == "baseline":
        result = run_baseline(args, image_dir)
    else:
        result = run_stage(args, image_dir, out / "openai-stage-workdir", args.child)
    result["case"] = args.case
    args.child_out.write_text(json.dumps(result) + "\n")


# --------------------------------------------------------------------------- the server

def post(url: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def reset_caches(root_url: str) -> dict:
    """Empty the server's prefix and multimodal caches (vLLM's dev-mode routes), so that a run
    never reuses the previous run's work on the same images. The statuses are recorded."""
    return {route: post(f"{root_url}{route}") for route in ("/reset_prefix_cache", "/reset_mm_cache")}


class BusySpan:
    """Polls the vLLM server's /metrics every 0.2 s on a thread (requests running + waiting):
    the span from the first poll that sees a request to the first one that sees none after the
    last, and the mean number at the server meanwhile. The same outside measure for every route:
    rows over this span is how fast the server got the route's work done, without the stage's
    start-up and without counting on where a route's timers sit."""

    period_s = 0.2

    def __init__(self, root_url: str) -> None:
        self.url, self.samples = f"{root_url}/metrics", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="busy-span", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                continue
            total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")))
            self.samples.append((time.perf_counter(), total))

    def __enter__(self) -> "BusySpan":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def span(self) -> tuple[float, float]:
        """(first time seen busy, first time seen idle after the last busy sample)."""
        busy = [i for i, (_, n) in enumerate(self.samples) if n > 0]
        if not busy:
            raise RuntimeError("the server was never seen busy: poll too slow for this run?")
        end = min(busy[-1] + 1, len(self.samples) - 1)
        return self.samples[busy[0]][0], self.samples[end][0]

    def summary(self, rows: int) -> dict:
        t0, t1 = self.span()
        during = [n for t, n in self.samples if t0 <= t < t1]
        return {"busy_s": t1 - t0, "rows_per_busy_s": rows / (t1 - t0), "server_in_flight": statistics.mean(during)}


# --------------------------------------------------------------------------- parent

def summarize(runs: list[dict]) -> dict:
    """The ratio: rows over the server's busy span, the same outside measure for both routes.
    Also kept (ratio_report): the stage's own steady rate (`report.rows_per_s`) over the
    baseline's rate counted the same way (after as many answers as the stage's first results)."""
    summary = ratios_to_baseline(runs, "rows_per_busy_s")
    for run in runs:
        base = next((r for r in runs if r["route"] == "baseline" and r["case"] == run["case"]
                     and r["round"] == run["round"]), None)
        if "ratio" in run and base:
            alike = steady_as_stage(base["answer_s"], run["first_batch_rows"])
            run["ratio_report"] = run["rows_per_s"] / alike if alike else float("nan")
    return summary


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; vllm {results['versions']['vllm']}, ray {results['versions']['ray']}; "
             f"code measured: {results.get('label') or '-'}. One vLLM OpenAI-compatible server on loopback "
             f"(`vllm.entrypoints.openai.api_server`, started in {results['server_start_s']:.0f} s; prefix and "
             f"multimodal caches reset before each run: {results['cache_reset']}) serving the tiny Qwen2-VL (random "
             f"weights, lm_head row of EOS scaled to norm {results['eos_norm']:g}); {results['images']} JPEGs 640x480 "
             f"(q90) scaled to <= 224*224 with `load_image`, sent as JPEG q{JPEG_QUALITY} data URLs, image before "
             f"text, greedy, max_tokens {MAX_TOKENS}, {results['concurrency']} requests in flight in every route. "
             f"Each run in a fresh process. Baseline: asyncio + httpx.AsyncClient with a semaphore of "
             f"{results['concurrency']}; stage: `describe.run(engine=\"openai\", concurrency="
             f"{results['concurrency']})`. Rows/s: rows over the span in which the server had requests in its "
             f"scheduler (its /metrics polled every 0.2 s), the same outside measure for both routes (the stage's "
             f"start-up is outside it); CPU shares over that span. In brackets, each route's own measure: the "
             f"client's first-send-to-last-answer rate, the stage's steady rate (`report.rows_per_s`), and the "
             f"latter's ratio to the baseline's rate counted the same way (rows after as many answers as the "
             f"stage's first results, over the time from them to the last answer). Others' CPU "
             f"excludes the server, whose share is its own column. Command: `{results['command']}`.", "",
             "| case | round | route | requests | output tokens p10 / p50 / p90 / max (total) | mean requests at "
             "the server | server CPU | others' CPU | our CPU (cores) | rows/s (own measure) | stage/baseline "
             "(own measures) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        ratio = f"**{run['ratio']:.2f}** ({run['ratio_report']:.2f})" if "ratio" in run else ""
        at_server = run.get("server_in_flight")
        lines.append(f"| {CASES[run['case']]} | {run['round']} | {ROUTE_LABELS[run['route']]} | {run['rows']} | "
                     f"{lengths_cell(run['lengths'])} | {'-' if at_server is None else f'{at_server:.1f}'} | "
                     f"{run.get('server_cpu_share', 0):.0%} | "
                     f"{run.get('foreign_cpu_share', 0):.0%} | {run.get('own_cpu_cores', 0):.2f} | "
                     f"{run['rows_per_busy_s']:.1f} ({run['rows_per_s']:.1f}) | {ratio} |")
    lines += ratio_lines(results, CASES, ROUTE_LABELS)
    return "\n".join(lines) + "\n"


def progress(run: dict) -> str:
    return (f"{run['rows']} rows, {run['rows_per_busy_s']:.1f} rows/s ({run['rows_per_s']:.1f} own measure), "
            f"tokens {lengths_cell(run['lengths'])}, at server {run['server_in_flight']:.1f}, "
            f"others' CPU {run.get('foreign_cpu_share', 0):.0%}"
            + (f", {run['resends']} resent" if run.get("resends") else ""))


def update_docs(section: str) -> None:
    replace_section("describe_openai.py", "## describe: openai engine vs a plain httpx client\n\n"
                    f"_Written by `bench/describe_openai.py`._\n\n{section}", before="<!-- bench/train.py: begin -->")


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    from tests.servers import vllm_openai_server

    out = args.out.resolve()
    make_images(out / f"images-{args.images}", args.images)
    model = build_model(out, args.eos_norm)
    results = results_header("bench/describe_openai.py", args, images=args.images, eos_norm=args.eos_norm,
                             concurrency=args.concurrency)
    with vllm_openai_server(model, workdir=out / "openai-server", startup_timeout_s=900, limit_images=1,
                            env={"VLLM_SERVER_DEV_MODE": "1"}) as server:
        results["server_start_s"] = server.started_s
        print(f"server up after {server.started_s:.0f} s at {server.base_url}", flush=True)

        def before_run() -> None:
            results["cache_reset"] = reset_caches(server.root_url)

        child_args = ["--images", str(args.images), "--out", str(out), "--concurrency", str(args.concurrency),
                      "--base-url", server.base_url, "--model", server.model, "--server-pid", str(server.process.pid)]
        run_rounds(args, Path(__file__).resolve(), results, out / "describe-openai-results.json", child_args,
                   progress, before_run)
    results["summary"], results["same_tokens"] = summarize(results["runs"]), same_tokens(results["runs"])
    finish(results, out / "describe-openai-results.json", markdown(results), update_docs, args.no_docs)


if __name__ == "__main__":
    main()
