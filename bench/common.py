"""Helpers shared by the bench scripts that run each route in a fresh child process and serve
an endpoint from another process (bench/describe_openai.py, bench/ceiling.py,
bench/translate_vllm.py): a CPU timeline that needs no hook inside the stage, the child-process
runner, and the plain asyncio/httpx chat client (the baseline a user would write)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.docs_section import markers, replace_section


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and its live descendants: vLLM's engine
    processes, the local Ray cluster, the video decoder helper."""
    return sum(tree_cpu_by_pid().values())


def tree_cpu_by_pid(pid: int | None = None) -> dict[int, float]:
    """pid -> CPU seconds (user + system) of process `pid` (default: this one) and each of its
    live descendants; empty when it is gone."""
    return {p: cpu for p, (cpu, _) in tree_cpu_and_role(pid).items()}


def tree_cpu_and_role(pid: int | None = None) -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds, its role) for `pid` (default: this one) and its descendants. Roles:
    "worker" for vLLM's model worker (the forward passes), "engine" for vLLM's other engine
    processes (EngineCore), both titled "VLLM::..." by vLLM, and "" for everything else."""
    import psutil
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for process in processes:
        try:
            times = process.cpu_times()
            name = process.name()
            role = "worker" if name.startswith("VLLM::Worker") else "engine" if name.startswith("VLLM::") else ""
            out[process.pid] = (times.user + times.system, role)
        except psutil.Error:
            pass
    return out


def percentiles(lengths: list[int]) -> dict:
    arr = np.asarray(lengths)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (10, 50, 90)} | {
        "max": int(arr.max()), "mean": float(arr.mean()), "total": int(arr.sum())}


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine (all but idle and iowait), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Timeline:
    """Samples, every `period_s` on a thread: time, the machine's busy CPU, this process tree's
    CPU and a server's process tree CPU (an endpoint we started, but whose CPU is not the
    route's), and the part of our own CPU that vLLM's engine processes took (what is left is the
    route's own cost: vLLM's front end, our stage, Ray). A window is then cut afterwards from
    the times the route reports (a stage's report gives start-up and wall time), so no hook
    inside the stage is needed. A process that ends keeps the CPU it was last seen with (Ray's
    workers end with the run)."""

    def __init__(self, server_pid: int | None = None, period_s: float = 0.5) -> None:
        self.server_pid, self.period_s = server_pid, period_s
        self.samples: list[tuple[float, ...]] = []
        self._own: dict[int, tuple[float, str]] = {}   # pid -> (CPU seconds, role)
        self._server: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-timeline", daemon=True)

    def _sample(self) -> None:
        self._own.update(tree_cpu_and_role())
        if self.server_pid is not None:
            self._server.update(tree_cpu_by_pid(self.server_pid))
        own = sum(cpu for cpu, _ in self._own.values())
        engine = sum(cpu for cpu, role in self._own.values() if role)
        worker = sum(cpu for cpu, role in self._own.values() if role == "worker")
        self.samples.append((time.perf_counter(), _busy_s(), own, sum(self._server.values()), engine, worker))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "Timeline":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def at(self, t: float) -> tuple[float, ...]:
        """The counters at time t, linearly interpolated between the two samples around it (a
        steady window of a few seconds is then not rounded to the sampling period)."""
        samples = self.samples
        if t <= samples[0][0]:
            return samples[0]
        for before, after in zip(samples, samples[1:]):
            if before[0] <= t <= after[0]:
                w = (t - before[0]) / (after[0] - before[0]) if after[0] > before[0] else 0.0
                return tuple(b + w * (a - b) for b, a in zip(before, after))  # type: ignore[return-value]
        return samples[-1]

    def window(self, t0: float, t1: float) -> dict:
        """CPU use between t0 and t1 (perf_counter times): our own CPU seconds (and those of vLLM's
        engine processes among them), the server's share of the machine and the share other
        users took."""
        first, last = self.at(t0), self.at(t1)
        dt = last[0] - first[0]
        if dt <= 0:
            return {"window_s": 0.0}
        busy, own, server, engine, worker = (last[i] - first[i] for i in (1, 2, 3, 4, 5))
        machine = dt * (os.cpu_count() or 1)
        # the model worker's busy share is the engine's duty cycle: on a CPU machine it runs the
        # forward passes on its own core, and the rate follows it (docs/benchmarks.md)
        return {"window_s": dt, "own_cpu_s": own, "own_cpu_cores": own / dt, "engine_cpu_s": engine,
                "model_worker_cores": worker / dt,
                "server_cpu_share": server / machine, "foreign_cpu_share": max(0.0, busy - own - server) / machine}


def run_child(script: Path, args: list[str], result_path: Path, timeout_s: float = 1800) -> dict:
    """Run `script` with `args` in a fresh Python process; it writes its result as JSON to
    result_path (each route in its own process: no engine, Ray or import state is shared)."""
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *args, "--child-out", str(result_path)],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def engine_queue_of(report: Any) -> list[int | None]:
    """A stage report's engine queue (10th percentile, median) for a run's JSON."""
    return [report.engine_queue_at(0.1), report.engine_queue_at(0.5)]


def engine_queue_cell(run: dict) -> str:
    """The table cell: "all" for the baseline (every request handed over at once)."""
    held = run.get("engine_queue") or [None, None]
    return "all" if run["route"] == "baseline" else "-" if held[0] is None else f"{held[0]} / {held[1]}"


def steady_as_stage(finish_s: list[float] | None, first_rows: int) -> float | None:
    """The baseline's rate counted as the stage counts its own (`report.rows_per_s`): rows after
    the first `first_rows` results (a stage run's first_batch_rows) over the time
    from them to the last. The same formula on both sides, so its bias (requests finished before
    the first results count as after them) cancels in the ratio."""
    if not finish_s or first_rows >= len(finish_s):
        return None
    k = max(1, first_rows)
    span = finish_s[-1] - finish_s[k - 1]
    return (len(finish_s) - k) / span if span > 0 else None


# --------------------------------------------------------------------------- the plain client

async def _post_all(url: str, payloads: list[dict], concurrency: int, timeout_s: float) -> tuple[float, list, int]:
    """What a user would write: one httpx.AsyncClient, a semaphore of `concurrency`, one task
    per request, all gathered, and one resend of a request whose kept-alive connection the
    server closed as it went out (httpx.ReadError / RemoteProtocolError: it ended a run of this
    benchmark once). Returns (first send, [(answer time, completion tokens)], resends)."""
    import httpx
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    resends = 0
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def post(payload: dict):
            nonlocal resends
            try:
                return await client.post(url, json=payload)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                resends += 1
                return await client.post(url, json=payload)

        async def one(payload: dict) -> tuple[float, int]:
            async with slots:
                response = await post(payload)
            response.raise_for_status()   # a failed request would make the timing meaningless
            return time.perf_counter(), int(response.json()["usage"]["completion_tokens"])
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in payloads))
    return t0, list(answers), resends


def plain_client_run(base_url: str, payloads: list[dict], concurrency: int, timeout_s: float = 600.0) -> dict:
    """Send every payload with the plain client: rows/s from the first send to the last answer
    (t_first_send, t_last_answer: perf_counter times, for the caller's CPU window)."""
    url = f"{base_url.rstrip('/')}/chat/completions"
    t0, answers, resends = asyncio.run(_post_all(url, payloads, concurrency, timeout_s))
    t_last = max(t for t, _ in answers)
    return {"route": "baseline", "rows": len(answers), "resends": resends, "wall_s": t_last - t0,
            "rows_per_s": len(answers) / (t_last - t0),
            "t_first_send": t0, "t_last_answer": t_last, "answer_s": sorted(t - t0 for t, _ in answers),
            "lengths": percentiles([n for _, n in answers])}


# --------------------------------------------------------------------------- script plumbing

def add_run_args(parser, cases: dict, routes: tuple, out: Path) -> None:
    """The options every side-by-side script here takes, and the hidden ones of its children."""
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all routes per case, alternated")
    parser.add_argument("--cases", default=",".join(cases), help="comma-separated subset of: " + ", ".join(cases))
    parser.add_argument("--routes", default=",".join(routes), help="comma-separated subset of: " + ", ".join(routes))
    parser.add_argument("--quick", action="store_true", help="smoke run: small, one case, no docs")
    parser.add_argument("--out", type=Path, default=out, help="bench data and results (git-ignored)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--label", default="", help="a note for this run (e.g. the commit measured)")
    parser.add_argument("--child", choices=routes, help=argparse.SUPPRESS)   # a child process runs one route
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)


def finish(results: dict, json_path: Path, section: str, update_docs, no_docs: bool) -> None:
    """Save the raw results, print the table and (unless no_docs) rewrite the script's section."""
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(section)
    if not no_docs:
        update_docs(section)


def same_tokens(runs: list[dict]) -> dict[str, bool]:
    """Per case: did every route produce the same total of output tokens (greedy: it must)?"""
    return {c: len({r["lengths"]["total"] for r in runs if r["case"] == c}) == 1
            for c in dict.fromkeys(r["case"] for r in runs)}


def ratios_to_baseline(runs: list[dict], key: str = "rows_per_s") -> dict:
    """Per case and route: each run's run[key] over its round's baseline's, stored in
    run["ratio"], and the median."""
    out: dict = {}
    for run in runs:
        base = next((r for r in runs if r["route"] == "baseline" and r["case"] == run["case"]
                     and r["round"] == run["round"]), None)
        if run["route"] == "baseline" or base is None:   # --routes without the baseline: no ratio
            continue
        run["ratio"] = run[key] / base[key]
        out.setdefault(f"{run['case']}/{run['route']}", []).append(run["ratio"])
    return {k: {"ratios": v, "median": statistics.median(v)} for k, v in out.items()}


# describe's stage routes in the benchmarks: route -> (executor, load_on), and their labels. Ray's
# default (auto) loads images in the engine actor for vLLM, and the openai engine's on tasks.
DESCRIBE_ROUTES = {"stage": ("ray", "auto"), "stage-tasks": ("ray", "tasks"), "stage-engine": ("ray", "engine"),
                   "stage-local": ("local", "auto")}
DESCRIBE_ROUTE_LABELS = {"stage": "stage (Ray)", "stage-tasks": "stage (Ray, `--load-on tasks`)",
                         "stage-engine": "stage (Ray, `--load-on engine`)", "stage-local": "stage (executor local)"}


def round_order(routes: list[str], round_no: int) -> list[str]:
    """The routes of round `round_no` (from 1): as given in odd rounds, reversed in even ones. The
    machine's speed drifts, within a run by up to a quarter (tenth session): in a fixed order a
    drift always favours the same route of each pair; alternating the order, it favours the
    baseline in one round and the stage in the next, and the median over rounds cancels it."""
    return list(routes) if round_no % 2 else list(routes)[::-1]


def run_rounds(args, script: Path, results: dict, json_path: Path, child_args: list[str], progress,
               before_run=None) -> None:
    """Every case, round and route of a script, each route in a fresh child process, alternated
    so that drift on a shared machine hits them all (`round_order`); the raw results are saved
    after each run. `progress(run)` is the line printed after a run; `before_run()` runs before
    each one."""
    for case in args.cases.split(","):
        for round_no in range(1, args.repeats + 1):
            for route in round_order(args.routes.split(","), round_no):
                if before_run is not None:
                    before_run()
                run = run_child(script, ["--child", route, "--case", case, *child_args],
                                args.out.resolve() / f"child-{script.stem}-{route}.json")
                run["round"] = round_no
                results["runs"].append(run)
                print(f"[{case} {round_no}] {route}: {progress(run)}", flush=True)
                json_path.write_text(json.dumps(results, indent=2) + "\n")


def ratio_lines(results: dict, cases: dict, routes: dict, extra=lambda value: "",
                title: str = "Median stage/baseline (target >= 0.95)") -> list[str]:
    """The summary under a table: median stage/baseline per case and route (with `extra(value)`
    after each), and the greedy sanity check on output tokens."""
    return ["", f"{title}: " + "; ".join(
        f"{cases[k.split('/')[0]]}, {routes[k.split('/')[1]]}: **{v['median']:.2f}**{extra(v)}"
        for k, v in results["summary"].items()) + ".", "",
        "Same output tokens in every route of a case (greedy): " + ", ".join(
            f"{cases[c]}: {'yes' if ok else '**NO**'}" for c, ok in results["same_tokens"].items()) + ".", ""]


def lengths_cell(lengths: dict) -> str:
    """Output tokens 'p10 / p50 / p90 / max (total)' for a table cell."""
    return (f"{lengths['p10']:g} / {lengths['p50']:g} / {lengths['p90']:g} / {lengths['max']} "
            f"({lengths['total']})")


def results_header(script: str, args, **fields) -> dict:
    """The start of a script's raw results: machine, versions, command line, label, the runs."""
    import ray
    import vllm

    from bench.describe import machine
    return {"machine": machine(), "versions": {"vllm": vllm.__version__, "ray": ray.__version__},
            "command": " ".join([script, *sys.argv[1:]]), "label": args.label, **fields, "runs": []}


# --------------------------------------------------------------------------- device-bound emulation

DEVICE_PAD_LAYERS = 14   # zero-output decoder layers added to the tiny model (2 layers -> 16)
DEVICE_BOUND_HELP = ("emulate a GPU node: vLLM's model worker alone on one core, with "
                     f"{DEVICE_PAD_LAYERS} zero-output layers added to the model so that its forward passes are "
                     "the bottleneck, and every other process (vLLM's front end and EngineCore, Ray, the stage) "
                     "on the other cores; results go to their own section")

DEVICE_BOUND_NOTE = (
    "**Device-bound emulation (`--device-bound`), the shape of a GPU node:** vLLM's model worker alone on "
    f"the last core (`VLLM_CPU_OMP_THREADS_BIND`), and the model given {DEVICE_PAD_LAYERS} decoder layers more "
    "whose outputs are zero (bench/common.py `pad_layers`): they change nothing the model computes and make its "
    "forward passes the bottleneck, as a GPU's are. Every other process (vLLM's front end and EngineCore, Ray, "
    "the stage's own work) has the other cores. Under this affinity the model worker's OpenMP threads spin "
    "while they wait, so a column of its CPU reads about 1.00 and says nothing.")


def write_device_bound_section(script: str, title: str, body: str) -> None:
    """A script's `--device-bound` results in docs/benchmarks.md: their own section (placed after
    the script's own one the first time), headed by what the emulation is."""
    replace_section(f"{script} --device-bound", f"## {title}, device-bound (the model worker on a core of its "
                    f"own)\n\n_Written by `bench/{script} --device-bound`; notes below are by hand._\n\n"
                    f"{DEVICE_BOUND_NOTE}\n\n{body}", after=markers(script)[1])


def pin_device_core() -> dict:
    """The device-bound emulation's affinity. On a GPU node the forward passes run on the GPU, and
    the host's cores do the rest; here vLLM's model worker gets the last core to itself
    (VLLM_CPU_OMP_THREADS_BIND) and this process the others. Call it first in a child process:
    vLLM's engine processes, Ray and the stage's workers inherit both."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--device-bound needs at least two cores")
    device, host = cpus[-1], set(cpus[:-1])
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(device)
    os.sched_setaffinity(0, host)
    return {"device_cpu": device, "host_cpus": sorted(host)}


def pad_layers(base: Path, extra: int = DEVICE_PAD_LAYERS) -> Path:
    """A copy of the model folder `base` with `extra` decoder layers appended whose attention and
    MLP outputs are zero (o_proj and down_proj zero), so each adds to the residual stream exactly
    nothing: the model computes what `base` computes, with more work per step for the model
    worker (the emulated GPU). Built once next to `base`; reused when it exists."""
    target = base.with_name(f"{base.name}-pad{extra}")
    if (target / "model.safetensors").exists():
        return target
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config", config)
    tensors = load_file(str(base / "model.safetensors"))
    first = next(k for k in tensors if ".layers.0." in k)   # the language model's (vision towers have blocks)
    prefix = first.split(".layers.0.")[0] + ".layers."
    layer0 = {k[len(prefix) + 2:]: v for k, v in tensors.items() if k.startswith(prefix + "0.")}
    n = text["num_hidden_layers"]
    for i in range(n, n + extra):
        for name, value in layer0.items():
            silent = name.startswith(("self_attn.o_proj.", "mlp.down_proj."))
            tensors[f"{prefix}{i}.{name}"] = torch.zeros_like(value) if silent else value.clone()
    text["num_hidden_layers"] = n + extra
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"] + [text["layer_types"][0]] * extra
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
