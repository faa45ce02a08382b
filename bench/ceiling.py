"""Pipeline ceiling of the describe stage: rows/s and rows per CPU-second of the stage's own
processes (load, resize, JPEG encode, HTTP, write) against an OpenAI-compatible endpoint that
answers instantly, so that nothing but the stage limits the rate. It says how many GPUs one CPU
node can feed: a node with K cores feeds about K x (rows per CPU-second) rows/s.

    .venv/bin/python bench/ceiling.py [--images 512] [--concurrency 32] [--repeats 1]
        [--cases 1view,5views] [--routes endpoint-max,stage,stage-engine,stage-local] [--quick] [--no-docs]

The endpoint (`--serve`, in this file) runs in its OWN process, started by the parent, so its CPU
is never counted as the stage's: a minimal asyncio HTTP/1.1 server with keep-alive that reads the
request, counts its image parts and answers a fixed completion (8 tokens) at once. Routes, each in
a fresh process (the same code as bench/describe_openai.py):
- endpoint-max: the plain asyncio/httpx client (semaphore of C) sending the same pre-encoded
  requests as fast as it can: the endpoint's rate with that client (a lower bound of the
  endpoint's own ceiling: on a small machine the client is the limit). It must be well above
  the stage's rate, and the endpoint's CPU share during the stage runs shows its headroom.
- stage / stage-engine / stage-local: `describe.run(engine="openai", concurrency=C)` on a local
  Ray (media loaded on Ray tasks, `--load-on auto`) / the same with `--load-on engine` (media
  loaded in the engine actor) / with executor="local", over N COCO-sized JPEGs (640x480,
  bench/describe.py `make_images`).
Rows/s and rows per CPU-second are taken over the steady middle of each run, seen from the
endpoint (it records each answer's time): from the answer at 10% of the requests to the one at
90%; rows in it over the CPU seconds of the route's process tree (driver, Ray's processes and
workers) in it. The whole run's figure (start-up included) is shown too.

Results: a markdown table on stdout, the "describe: pipeline ceiling" section of
docs/benchmarks.md and the raw numbers in <out>/ceiling-results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's packages

from bench import describe_openai  # noqa: E402
from bench.common import (DESCRIBE_ROUTE_LABELS, Timeline, add_run_args, finish, plain_client_run,  # noqa: E402
                          results_header, run_rounds)
from bench.describe import make_images  # noqa: E402
from bench.docs_section import replace_section  # noqa: E402

CASES = describe_openai.CASES
ROUTES = ("endpoint-max", "stage", "stage-engine", "stage-local")
ROUTE_LABELS = {"endpoint-max": "plain httpx client (endpoint's rate)", **DESCRIBE_ROUTE_LABELS}
MODEL = "instant-endpoint"
ANSWER_TOKENS = 8
ENDPOINT_MAX_REQUESTS = 3000   # at least this many requests for the endpoint's rate (the payloads repeated)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    describe_openai.add_endpoint_args(parser)
    add_run_args(parser, CASES, ROUTES, ROOT / "bench" / "out")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)   # the endpoint process
    args = parser.parse_args()
    if args.quick:   # a smoke run: a few minutes
        args.images, args.cases, args.no_docs = 64, "1view", True
    return args


# --------------------------------------------------------------------------- the instant endpoint

_COMPLETION = json.dumps({
    "id": "chatcmpl-instant", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b c d e f g h"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 100, "completion_tokens": ANSWER_TOKENS, "total_tokens": 100 + ANSWER_TOKENS}}).encode()
_MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()


def serve(port: int) -> None:
    """Answer every chat request at once with a fixed completion. No JSON parsing (only a count
    of image parts, a byte search), so the endpoint costs as little CPU per request as it can."""
    stats: dict = {"requests": 0, "images": 0, "bytes": 0, "answered_at": []}   # epoch seconds of each answer

    def response(status: str, body: bytes) -> bytes:
        return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode() + body)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:   # keep-alive: requests one after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in header_lines:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                method, path = request_line.split(" ")[:2]
                if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                    stats["requests"] += 1
                    stats["images"] += body.count(b'"image_url"') // 2   # {"type": "image_url", "image_url": ...}
                    stats["bytes"] += len(body)
                    writer.write(response("200 OK", _COMPLETION))
                    stats["answered_at"].append(time.time())
                elif path.rstrip("/").endswith("/models"):
                    writer.write(response("200 OK", _MODELS))
                elif path == "/stats":
                    if method == "POST":   # a new run: counts and span from zero
                        stats.update(requests=0, images=0, bytes=0, answered_at=[])
                    writer.write(response("200 OK", json.dumps(stats).encode()))
                else:
                    writer.write(response("200 OK", b"{}"))   # /health
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def endpoint_stats(root_url: str, reset: bool = False) -> dict:
    """The endpoint's counts (reset=True: and start them again from zero)."""
    request = urllib.request.Request(f"{root_url}/stats", method="POST" if reset else "GET",
                                     data=b"" if reset else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class EndpointSpan:
    """The steady middle of a run, seen from the endpoint: from its answer at 10% of the run's
    requests to its answer at 90% (the endpoint records each answer's time; its counts are
    reset at the start). Ramp-up (Ray, actors, the first loads) and the tail stay outside, on
    both ends, so rows per CPU-second in it is the pipeline's steady cost per row."""

    def __init__(self, root_url: str) -> None:
        self.root_url = root_url

    def __enter__(self) -> "EndpointSpan":
        endpoint_stats(self.root_url, reset=True)
        self.offset = time.time() - time.perf_counter()   # epoch -> this process's perf_counter
        return self

    def __exit__(self, *exc) -> None:
        self.stats = endpoint_stats(self.root_url)
        times = sorted(self.stats.pop("answered_at"))
        self.first, self.last = int(0.1 * len(times)), int(0.9 * len(times)) - 1
        self.times = times

    def span(self) -> tuple[float, float]:
        return self.times[self.first] - self.offset, self.times[self.last] - self.offset

    def summary(self, rows: int) -> dict:
        t0, t1 = self.span()
        window_rows = self.last - self.first
        return {"busy_s": t1 - t0, "window_rows": window_rows, "rows_per_busy_s": window_rows / (t1 - t0),
                "server_in_flight": None, "endpoint_saw": {k: self.stats[k] for k in ("requests", "images")}}


class Endpoint:
    """The instant endpoint in its own process (own session, stopped as a group)."""

    def __enter__(self) -> "Endpoint":
        from tests.servers import free_port
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port)],
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.root_url}/health", timeout=2):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("the instant endpoint exited at start")
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("the instant endpoint did not come up within 60 s")

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return endpoint_stats(self.root_url)

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


# --------------------------------------------------------------------------- routes (child processes)

def run_endpoint_max(args: argparse.Namespace, image_dir: Path) -> dict:
    prompts = [v.prompt_for("image") for v in describe_openai.views_of(args.case)]
    payloads = describe_openai.chat_payloads(args.model, sorted(image_dir.glob("*.jpg")), prompts)
    payloads = payloads * -(-ENDPOINT_MAX_REQUESTS // len(payloads))   # long enough to be past the ramp-up
    with Timeline(args.server_pid) as timeline, EndpointSpan(args.base_url.removesuffix("/v1")) as busy:
        result = plain_client_run(args.base_url, payloads, args.concurrency)
    result.pop("answer_s")   # thousands of times nobody reads here
    return result | busy.summary(result["rows"]) | timeline.window(*busy.span()) | {"route": "endpoint-max"}


def child_main(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    image_dir = out / f"images-{args.images}"
    if args.child == "endpoint-max":
        result = run_endpoint_max(args, image_dir)
    else:
        result = describe_openai.run_stage(args, image_dir, out / "ceiling-stage-workdir", args.child, EndpointSpan)
    result["case"] = args.case
    args.child_out.write_text(json.dumps(result) + "\n")


# --------------------------------------------------------------------------- parent

def rows_per_cpu_s(run: dict) -> float | None:
    """Rows per CPU-second of the route's own process tree in the steady middle (EndpointSpan)."""
    return run["window_rows"] / run["own_cpu_s"] if run.get("own_cpu_s") else None


def whole_per_cpu(run: dict) -> str:
    """Rows per CPU-second over the whole run (Ray's and the actors' start-up included)."""
    value = (run.get("whole_run") or {}).get("rows_per_cpu_s")
    return "-" if value is None else f"{value:.1f}"


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; ray {results['versions']['ray']}; code measured: "
             f"{results.get('label') or '-'}. "
             f"{results['images']} JPEGs 640x480 (q90, ~100 KB) loaded and scaled to <= 224*224 by the stage, sent "
             f"as JPEG data URLs to an instant OpenAI-compatible endpoint on loopback (its own process: a minimal "
             f"asyncio HTTP server answering {ANSWER_TOKENS} fixed tokens), {results['concurrency']} requests in "
             f"flight. Each run in a fresh process. Rows/s and rows per CPU-second over the steady middle of a run, "
             f"seen from the endpoint (from its answer at 10% of the requests to the one at 90%): rows in it over "
             f"the CPU seconds of the route's own process tree (driver, Ray's processes and workers; never the "
             f"endpoint's); the whole run's figure includes the start-up. The plain client's row sends the same "
             f"requests, pre-encoded and repeated to {ENDPOINT_MAX_REQUESTS} or more: its rate bounds the "
             f"endpoint's from below (the client is the limit on a small machine; the endpoint CPU column shows the "
             f"endpoint's own load). Others' CPU excludes the endpoint. Command: `{results['command']}`.",
             "", "| case | round | route | requests | endpoint saw (requests / images) | endpoint CPU | others' CPU "
             "| our CPU (cores) | rows/s | rows per CPU-second | rows per CPU-second, whole run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        seen = run.get("endpoint_saw", {})
        per_cpu = rows_per_cpu_s(run)
        lines.append(f"| {CASES[run['case']]} | {run['round']} | {ROUTE_LABELS[run['route']]} | {run['rows']} | "
                     f"{seen.get('requests', '-')} / {seen.get('images', '-')} | "
                     f"{run.get('server_cpu_share', 0):.0%} | "
                     f"{run.get('foreign_cpu_share', 0):.0%} | {run.get('own_cpu_cores', 0):.2f} | "
                     f"{run['rows_per_busy_s']:.1f} | {'-' if per_cpu is None else f'**{per_cpu:.1f}**'} | "
                     f"{whole_per_cpu(run)} |")
    lines += [""]
    for key, value in results["summary"].items():
        case, route = key.split("/")
        lines.append(f"- {CASES[case]}, {ROUTE_LABELS[route]}: median **{value['rows_per_cpu_s']:.1f} rows per "
                     f"CPU-second** ({value['rows_per_s']:.1f} rows/s); the endpoint's rate with the plain client: "
                     f"{value['endpoint_max']:.0f} rows/s.")
    return "\n".join(lines + [""]) + "\n"


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in dict.fromkeys(f"{r['case']}/{r['route']}" for r in runs if r["route"] != "endpoint-max"):
        case, route = key.split("/")
        mine = [r for r in runs if r["case"] == case and r["route"] == route]
        top = [r["rows_per_busy_s"] for r in runs if r["case"] == case and r["route"] == "endpoint-max"]
        out[key] = {"rows_per_cpu_s": statistics.median(rows_per_cpu_s(r) or 0 for r in mine),
                    "rows_per_s": statistics.median(r["rows_per_busy_s"] for r in mine),
                    "endpoint_max": statistics.median(top) if top else float("nan")}
    return out


def progress(run: dict) -> str:
    return (f"{run['rows']} rows, {run['rows_per_busy_s']:.1f} rows/s, {rows_per_cpu_s(run) or 0:.1f} rows per "
            f"CPU-s, endpoint CPU {run.get('server_cpu_share', 0):.0%}, saw {run['endpoint_saw']}")


def update_docs(section: str) -> None:
    replace_section("ceiling.py", "## describe: pipeline ceiling (instant endpoint)\n\n"
                    f"_Written by `bench/ceiling.py`._\n\n{section}", before="<!-- bench/train.py: begin -->")


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.child:
        child_main(args)
        return
    out = args.out.resolve()
    make_images(out / f"images-{args.images}", args.images)
    results = results_header("bench/ceiling.py", args, images=args.images, concurrency=args.concurrency)
    with Endpoint() as endpoint:
        child_args = ["--images", str(args.images), "--out", str(out), "--concurrency", str(args.concurrency),
                      "--base-url", f"{endpoint.root_url}/v1", "--model", MODEL,
                      "--server-pid", str(endpoint.process.pid)]
        run_rounds(args, Path(__file__).resolve(), results, out / "ceiling-results.json", child_args, progress)
    results["summary"] = summarize(results["runs"])
    finish(results, out / "ceiling-results.json", markdown(results), update_docs, args.no_docs)


if __name__ == "__main__":
    main()
