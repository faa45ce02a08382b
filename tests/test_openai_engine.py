"""The openai engine (`OpenAIDescriber`).

Slow tests run against a REAL vLLM OpenAI-compatible server on the tiny Qwen2-VL (random
weights: its text is noise, so they check token counts, finish reasons and error rows, not
words), directly and through the `describe` CLI on a local Ray. Fast tests run against
`ScriptedFakeEndpoint`, a scripted fake endpoint that answers 500/429/slow/400/garbled on
demand, to check retries, backoff, timeouts, error rows and bounded concurrency.
"""

from __future__ import annotations


import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines.engines import openai_engine
from pipelines.engines.base import DescribeRequest, EngineConfig, FatalEngineError, SamplingConfig
from pipelines.engines.openai_engine import OpenAIDescriber
from pipelines.failures import is_transient
from tests.conftest import run_cli
from tests.servers import (EMPTY_CHOICES, MALFORMED_JSON, OK, ScriptedFakeEndpoint, Step, free_port, http_error,
                           log_tail, prompt_of, sleep_then, vllm_openai_server)

SERVER_IMAGE_LIMIT = 8
# A private local Ray started by the CLI binds its GCS/raylet/driver ports to every interface
# unless Ray's cluster mode is off (read when ray is imported): keep it on loopback.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _image(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _video(seed: int, frames: int, h: int = 120, w: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _describer(base_url: str, model: str, **kw) -> OpenAIDescriber:
    sampling = kw.pop("sampling", SamplingConfig(max_tokens=8))
    cfg = EngineConfig(engine="openai", model=model, base_url=base_url, sampling=sampling, **kw)
    describer = OpenAIDescriber(cfg)
    describer.setup()
    return describer


def _count_posts(describer: OpenAIDescriber) -> list[dict]:
    """Wrap the describer's HTTP client so every chat POST's payload is recorded."""
    posted: list[dict] = []
    client = describer.chat.client
    real_post = client.post

    async def post(url, *args, **kwargs):
        posted.append(kwargs.get("json"))
        return await real_post(url, *args, **kwargs)

    client.post = post
    return posted


def _n_images(payload: dict) -> int:
    return sum(1 for part in payload["messages"][-1]["content"] if part["type"] == "image_url")


# =========================================================================== real vLLM server

@pytest.fixture(scope="session")
def vllm_server(tiny_qwen, session_tmp):
    with vllm_openai_server(tiny_qwen, workdir=session_tmp / "vllm-openai-server", limit_images=SERVER_IMAGE_LIMIT) as server:
        print(f"\nvLLM OpenAI server healthy after {server.started_s:.1f} s ({server.base_url})")
        yield server


@pytest.mark.slow
def test_real_server_image_video_and_one_invalid_request(vllm_server):
    describer = _describer(vllm_server.base_url, vllm_server.model, concurrency=4, timeout_s=60, max_retries=2,
                           sampling=SamplingConfig(max_tokens=8, ignore_eos=True))
    posted = _count_posts(describer)
    try:
        requests = [DescribeRequest("Describe this image.", "image", _image(0)),
                    DescribeRequest("Describe this video.", "video", _video(1, SERVER_IMAGE_LIMIT)),
                    DescribeRequest("Too many frames.", "video", _video(2, SERVER_IMAGE_LIMIT + 1)),
                    DescribeRequest("Describe this image.", "image", _image(0))]
        results = describer.describe(requests)
    finally:
        describer.close()
    assert len(results) == 4
    image, video, too_long, image_again = results
    for ok in (image, video, image_again):
        assert ok.error_kind is None and ok.error is None, (ok, log_tail(vllm_server.log_path))
        assert isinstance(ok.text, str)
        assert ok.prompt_tokens > 0
        assert ok.output_tokens == 8            # ignore_eos: exactly max_tokens
        assert ok.finish_reason == "length"
        assert ok.latency_s > 0
    assert video.prompt_tokens > image.prompt_tokens   # 8 frames cost more than one image
    assert image_again.text == image.text and image_again.prompt_tokens == image.prompt_tokens  # greedy
    assert too_long.error_kind == "http_400" and too_long.text is None
    assert f"At most {SERVER_IMAGE_LIMIT} image" in too_long.error
    # each request went out once: no retry for the 400, and 9 frames travelled as 9 images
    assert sorted(_n_images(p) for p in posted) == [1, 1, SERVER_IMAGE_LIMIT, SERVER_IMAGE_LIMIT + 1]


@pytest.mark.slow
def test_real_server_setup_rejects_wrong_model_and_closed_port(vllm_server):
    with pytest.raises(FatalEngineError, match="does not serve model 'no-such-model'") as info:
        _describer(vllm_server.base_url, "no-such-model")
    assert vllm_server.model in str(info.value)         # the message lists what is served
    port = free_port()  # nothing listens there
    with pytest.raises(FatalEngineError, match=rf"127\.0\.0\.1:{port}/v1 is not usable: ConnectError"):
        _describer(f"http://127.0.0.1:{port}/v1", vllm_server.model, timeout_s=5)


@pytest.mark.slow
def test_cli_describe_with_openai_engine(vllm_server, sample_data, tmp_path):
    workdir = tmp_path / "w"
    done = run_cli("describe", "--input", sample_data, "--workdir", workdir, "--engine", "openai",
                   "--model", vllm_server.model, "--base-url", vllm_server.base_url,
                   "--views", "objects,detailed", "--max-tokens", "8", "--no-progress", timeout=480, env=LOOPBACK_RAY)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    table = pq.read_table(workdir / "descriptions")
    schemas.validate(table.schema, schemas.DESCRIPTIONS, "descriptions")
    rows = table.to_pylist()
    manifest = pq.read_table(workdir / "manifest").to_pylist()
    assert len(manifest) == 15 and all(m["error_kind"] is None for m in manifest)
    keys = sorted((r["item_id"], r["view"]) for r in rows)
    assert keys == sorted((m["item_id"], v) for m in manifest for v in ("objects", "detailed"))  # once each
    assert [r for r in rows if r["error_kind"] or r["error"]] == []
    for r in rows:
        assert r["engine"] == "openai" and r["model"] == vllm_server.model
        assert isinstance(r["text"], str) and r["prompt_tokens"] > 0 and 1 <= r["output_tokens"] <= 8
        assert r["finish_reason"] in ("length", "stop")
    videos = [r for r in rows if r["media_type"] == "video"]
    assert len(videos) == 6 and all(r["n_frames"] == 8 for r in videos)
    assert all(r["n_frames"] == 1 for r in rows if r["media_type"] == "image")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["wrong_model", "closed_port"])
def test_cli_fatal_endpoint_error_exits_1(vllm_server, sample_data, tmp_path, target):
    if target == "wrong_model":
        model, base_url, expected = "no-such-model", vllm_server.base_url, "does not serve model 'no-such-model'"
    else:
        port = free_port()
        model, base_url, expected = vllm_server.model, f"http://127.0.0.1:{port}/v1", "is not usable: ConnectError"
    done = run_cli("describe", "--input", sample_data, "--workdir", tmp_path / "w", "--engine", "openai",
                   "--model", model, "--base-url", base_url, "--views", "objects", "--max-tokens", "4",
                   "--no-progress", timeout=300, env=LOOPBACK_RAY)
    assert done.returncode == 1, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    # Ray logs its own tracebacks to stderr first; the readable reason is the last line
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: fatal engine error:") and expected in last_line, done.stderr[-4000:]
    assert not list((tmp_path / "w").glob("descriptions/*.parquet"))   # nothing described, nothing written


# =========================================================================== scripted fake endpoint

@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setattr(openai_engine, "BACKOFF_BASE_S", 0.01)


def _fake_describer(fake: ScriptedFakeEndpoint, **kw) -> OpenAIDescriber:
    kw.setdefault("timeout_s", 10)
    return _describer(fake.base_url, fake.model, **kw)


def _one(prompt: str = "Describe.") -> DescribeRequest:
    return DescribeRequest(prompt, "image", _image(0, 32, 48))


def _run(fake: ScriptedFakeEndpoint, requests: list[DescribeRequest], **kw):
    describer = _fake_describer(fake, **kw)
    try:
        return describer.describe(requests)
    finally:
        describer.close()


@pytest.mark.parametrize("script", [[http_error(500), http_error(500), OK], [http_error(429), OK],
                                    [http_error(503), http_error(502), http_error(504), OK]],
                         ids=["500-500-ok", "429-ok", "503-502-504-ok"])
def test_retryable_status_then_success(script):
    with ScriptedFakeEndpoint(script) as fake:
        [result] = _run(fake, [_one()], max_retries=3)
        assert fake.attempts() == len(script)
    assert result.error_kind is None and result.text == "a scripted description"
    assert (result.prompt_tokens, result.output_tokens, result.finish_reason) == (11, 4, "stop")


def test_retry_exhaustion_gives_error_row_with_kind_and_attempts():
    with ScriptedFakeEndpoint([http_error(500, "engine overloaded")] * 5) as fake:
        [result] = _run(fake, [_one()], max_retries=2)
        assert fake.attempts() == 3
    assert result.error_kind == "http_500" and result.text is None
    assert result.error.startswith("after 3 attempts:") and "engine overloaded" in result.error
    assert result.latency_s is not None


def test_backoff_grows_exponentially_with_jitter_and_cap(monkeypatch):
    monkeypatch.setattr(openai_engine, "BACKOFF_BASE_S", 0.5)
    monkeypatch.setattr(openai_engine, "BACKOFF_MAX_S", 3.0)
    for retry, nominal in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0)]:
        waits = [openai_engine.backoff_s(retry) for _ in range(50)]
        assert all(0.5 * nominal <= w < 1.5 * nominal for w in waits)


def test_retries_sleep_the_backoff(monkeypatch):
    slept = []
    monkeypatch.setattr(openai_engine, "backoff_s", lambda retry: slept.append(retry) or 0.0)
    with ScriptedFakeEndpoint([http_error(500)] * 3 + [OK]) as fake:
        [result] = _run(fake, [_one()], max_retries=3)
    assert result.error_kind is None and slept == [1, 2, 3]


def test_timeout_is_retried_and_then_reported():
    with ScriptedFakeEndpoint([sleep_then(5.0), sleep_then(5.0)]) as fake:
        [result] = _run(fake, [_one()], timeout_s=0.5, max_retries=1)
        assert fake.attempts() == 2
    assert result.error_kind == "timeout" and result.error.startswith("after 2 attempts:")
    assert "no answer within 0.5s" in result.error


def test_timeout_then_success():
    with ScriptedFakeEndpoint([sleep_then(5.0), OK]) as fake:
        [result] = _run(fake, [_one()], timeout_s=0.5, max_retries=1)
        assert fake.attempts() == 2
    assert result.error_kind is None and result.text


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_client_errors_are_not_retried(status):
    with ScriptedFakeEndpoint([http_error(status, "At most 8 image(s) may be provided")]) as fake:
        [result] = _run(fake, [_one()], max_retries=3)
        assert fake.attempts() == 1
    assert result.error_kind == f"http_{status}" and "At most 8 image(s)" in result.error
    assert not result.error.startswith("after")


@pytest.mark.parametrize("step", [MALFORMED_JSON, EMPTY_CHOICES, Step(200, [1, 2, 3]), Step(200, {"choices": {}}),
                                  Step(200, {"choices": [{"message": {"role": "assistant", "content": None}}]}),
                                  Step(200, {"choices": [{"message": {"content": "x"}}], "usage": [1]}),
                                  Step(200, b"\xff\xfe not utf-8")],
                         ids=["malformed_json", "empty_choices", "list_body", "choices_not_list", "null_content",
                              "usage_not_dict", "not_utf8"])
def test_unexpected_body_gives_bad_response_without_retry(step):
    with ScriptedFakeEndpoint([step]) as fake:
        [result] = _run(fake, [_one()], max_retries=3)
        assert fake.attempts() == 1
    assert result.error_kind == "bad_response" and result.text is None and result.error


def test_bounded_concurrency():
    with ScriptedFakeEndpoint(default=sleep_then(0.3)) as fake:
        results = _run(fake, [_one(f"request {i}") for i in range(6)], concurrency=2)
        assert fake.attempts() == 6
        assert 1 <= fake.max_in_flight <= 2
    assert all(r.error_kind is None for r in results)


def test_mixed_batch_keeps_order_and_isolates_failures():
    scripts = {"bad": [http_error(400)], "flaky": [http_error(503), OK], "slow-but-fine": [sleep_then(0.2)],
               "down": [http_error(500)] * 10}
    prompts = ["good", "bad", "flaky", "slow-but-fine", "down", "good"]
    with ScriptedFakeEndpoint(scripts) as fake:
        results = _run(fake, [_one(p) for p in prompts], concurrency=3, max_retries=2)
        assert {p: fake.attempts(p) for p in prompts} == {"good": 2, "bad": 1, "flaky": 2, "slow-but-fine": 1,
                                                          "down": 3}
    assert [r.error_kind for r in results] == [None, "http_400", None, None, "http_500", None]


def test_connection_error_after_setup_is_an_error_row():
    fake = ScriptedFakeEndpoint()
    with fake:
        describer = _fake_describer(fake, max_retries=1, timeout_s=2)
    try:
        [result] = describer.describe([_one()])     # the endpoint is gone now
    finally:
        describer.close()
    assert result.error_kind == "connection" and result.error.startswith("after 2 attempts:")


def test_payload_carries_model_sampling_and_one_image_per_frame():
    sampling = SamplingConfig(max_tokens=5, temperature=0.0, seed=7)
    with ScriptedFakeEndpoint() as fake:
        _run(fake, [_one("an image"), DescribeRequest("a video", "video", _video(3, 4, 24, 32))], sampling=sampling)
        by_prompt = {prompt_of(b): b for b in fake.requests}
    image, video = by_prompt["an image"], by_prompt["a video"]
    assert image["model"] == fake.model and image["max_tokens"] == 5 and image["seed"] == 7
    assert image["temperature"] == 0.0 and "ignore_eos" not in image
    assert (_n_images(image), _n_images(video)) == (1, 4)
    urls = [p["image_url"]["url"] for p in video["messages"][-1]["content"] if p["type"] == "image_url"]
    assert all(u.startswith("data:image/jpeg;base64,") for u in urls) and len(set(urls)) == 4
    assert video["messages"][-1]["content"][-1] == {"type": "text", "text": "a video"}
    with ScriptedFakeEndpoint() as fake:
        _run(fake, [_one()], sampling=SamplingConfig(max_tokens=5, ignore_eos=True))
        assert fake.requests[0]["ignore_eos"] is True


def test_unencodable_media_is_an_error_row_not_a_request():
    with ScriptedFakeEndpoint() as fake:
        bad = DescribeRequest("float pixels", "image", np.zeros((8, 8, 3), np.float64))
        results = _run(fake, [bad, _one("fine")])
        assert fake.attempts("float pixels") == 0 and fake.attempts("fine") == 1
    assert results[0].error_kind == "invalid_request" and results[1].error_kind is None


def test_setup_fails_fast_on_wrong_model_or_closed_port():
    with ScriptedFakeEndpoint() as fake:
        with pytest.raises(FatalEngineError, match=r"does not serve model 'other'.*scripted-fake-model"):
            _describer(fake.base_url, "other")
        with pytest.raises(FatalEngineError, match="is not usable: HTTPStatusError"):
            _describer(fake.base_url.removesuffix("/v1") + "/wrong", fake.model)   # 404 on /models
    with pytest.raises(FatalEngineError, match="is not usable: ConnectError"):
        _describer(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=2)


# --------------------------------------------------------------------------- streaming (no batch barrier)

def test_concurrent_batches_share_the_window_and_a_fast_batch_returns_first():
    """Two batches handed in at once (as the stage's engine actors do): a slow request in the
    first must not hold back the second batch, and both batches' requests are in flight
    together (one window of `concurrency`, no per-batch barrier)."""
    import threading
    with ScriptedFakeEndpoint({"slow": [sleep_then(3.0)], "b1": [sleep_then(0.5)], "b2": [sleep_then(0.5)]}) as fake:
        describer = _fake_describer(fake, concurrency=4)
        finished: list[str] = []
        try:
            def run(name: str, prompts: list[str]) -> None:
                describer.describe([_one(p) for p in prompts])
                finished.append(name)
            first = threading.Thread(target=run, args=("with-slow", ["slow", "a1"]))
            first.start()
            while fake.attempts() < 2:   # the first batch's requests are out
                threading.Event().wait(0.01)
            run("fast", ["b1", "b2"])
            first.join()
        finally:
            describer.close()
        assert finished == ["fast", "with-slow"]
        assert fake.max_in_flight >= 3          # the slow request and the second batch at once


def test_views_of_one_item_encode_its_media_once(monkeypatch):
    calls = []
    real = openai_engine._data_url
    monkeypatch.setattr(openai_engine, "_data_url", lambda pixels: calls.append(1) or real(pixels))
    pixels = _image(5, 32, 48)
    with ScriptedFakeEndpoint() as fake:
        _run(fake, [DescribeRequest(f"view {i}", "image", pixels) for i in range(5)]
             + [DescribeRequest("another item", "image", _image(6, 32, 48))])
        urls = {prompt_of(b): b["messages"][-1]["content"][0]["image_url"]["url"] for b in fake.requests}
    assert len(calls) == 2                       # one encoding per item, not per view
    assert len({urls[f"view {i}"] for i in range(5)}) == 1 and urls["another item"] != urls["view 0"]
    # the image comes before the prompt text in every request (prefix sharing across views)
    assert all(b["messages"][-1]["content"][0]["type"] == "image_url" for b in fake.requests)


@pytest.mark.slow
def test_stage_writes_fast_results_before_a_slow_request_finishes(sample_data, tmp_path):
    """The describe stage on a local Ray against a scripted fake endpoint in which the first
    request takes 5 s and every other answers at once: all other rows, its batchmates in the
    same engine batch included (the default batch holds all 15 items), are written before it."""
    workdir = tmp_path / "w"
    with ScriptedFakeEndpoint([sleep_then(5.0)]) as fake:
        done = run_cli("describe", "--input", sample_data, "--workdir", workdir, "--engine", "openai",
                       "--model", fake.model, "--base-url", fake.base_url, "--views", "detailed",
                       "--concurrency", "4", "--no-progress", timeout=300, env=LOOPBACK_RAY)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(workdir / "descriptions").to_pylist()
    assert len(rows) == 15 and len({r["item_id"] for r in rows}) == 15 and not any(r["error_kind"] for r in rows)
    [slow] = [r for r in rows if r["latency_s"] >= 5.0]
    others = [r for r in rows if r is not slow]
    assert max(r["created_at"] for r in others) < slow["created_at"]


# --------------------------------------------------------------------------- outages (circuit breaker)

def test_an_outage_shorter_than_the_timeout_costs_waiting_not_error_rows(monkeypatch):
    monkeypatch.setattr(openai_engine, "PROBE_INTERVAL_S", 0.2)
    monkeypatch.setattr(openai_engine, "PROBE_MAX_S", 0.5)
    with ScriptedFakeEndpoint() as fake:
        fake.go_down(3.0)
        results = _run(fake, [_one(f"request {i}") for i in range(40)], concurrency=4, max_retries=1,
                       outage_timeout_s=60)
        down = fake.answered_down
    assert [r.error_kind for r in results] == [None] * 40
    # without the breaker, 40 requests x 2 attempts would all have gone out into the outage and
    # failed; with it, a few requests open it and then one probe at a time goes out
    assert openai_engine.OPEN_AFTER_FAILURES <= down < 4 + 3.0 / 0.2 + 4


def test_an_outage_longer_than_the_timeout_stops_with_the_endpoint_and_last_error(monkeypatch):
    monkeypatch.setattr(openai_engine, "PROBE_INTERVAL_S", 0.2)
    with ScriptedFakeEndpoint() as fake:
        fake.go_down(600.0, status=502)
        describer = _fake_describer(fake, concurrency=4, max_retries=1, outage_timeout_s=2)
        try:
            futures = describer.submit([_one(f"request {i}") for i in range(12)])
            errors = [f.exception(timeout=30) for f in futures]
        finally:
            describer.close()
        sent = fake.answered_down
    assert all(isinstance(e, openai_engine.EndpointOutageError) for e in errors)   # no request became an error row
    assert fake.base_url in str(errors[0]) and "last error: http_502" in str(errors[0])
    assert "--outage-timeout 2 s" in str(errors[0])
    assert sent < 12 * 2          # held back: fewer than every request's every attempt


def test_a_flaky_request_among_working_ones_never_opens_the_breaker():
    scripts = {"flaky": [http_error(500)] * 10}
    with ScriptedFakeEndpoint(scripts) as fake:
        results = _run(fake, [_one("flaky")] + [_one(f"ok {i}") for i in range(8)], concurrency=2, max_retries=3)
        assert fake.attempts("flaky") == 4
    assert results[0].error_kind == "http_500" and all(r.error_kind is None for r in results[1:])


def test_a_refusal_is_a_permanent_error_row():
    refusal = Step(200, {"choices": [{"message": {"role": "assistant", "content": None, "refusal": "no"},
                                      "finish_reason": "content_filter"}]})
    with ScriptedFakeEndpoint([refusal]) as fake:
        [result] = _run(fake, [_one()], max_retries=3)
        assert fake.attempts() == 1
    assert result.error_kind == "refused" and not is_transient(result.error_kind)
