"""The two kinds of failure, in one table (the README's "When things fail" shows it too).

Every error row carries an `error_kind`. A **permanent** failure is the row's own fault (bad
media, a request the model rejects, content it refuses): retrying cannot help, so the row stays
done; `--retry-errors` redoes it on purpose. A **transient** failure is not the row's fault (an
endpoint that was down, slow, overloaded, or misconfigured): within the run the client retries
it with backoff and jitter, and the circuit breaker holds new work while an endpoint fails
everything; a row that still failed is retried by the next plain rerun. A kind not named here
counts as transient: retrying an unknown failure costs one request, losing a row costs more.
"""

from __future__ import annotations

# the row's own fault: a rerun keeps these rows; --retry-errors redoes them
PERMANENT_KINDS = frozenset({
    # ingest: the manifest row itself is bad (a rerun reads the same manifest; re-ingest to change it)
    "bad_filename", "bad_annotation",
    # media (pipelines.media.MediaError kinds)
    "empty_file", "too_large", "unreadable_image", "decompression_bomb", "bad_aspect_ratio", "unreadable_video",
    "no_video_stream", "empty_video", "outside_root", "not_found", "unsupported_type",
    # the engine rejects this request (e.g. a prompt longer than the context) or refuses its content
    "invalid_request", "refused",
    # translate: a source the engine never sees
    "empty_source", "source_too_long",
})

# HTTP answers that blame the request itself; every other status is the endpoint's problem
# (401/403: a key, 404: a model name, 408/429/5xx: load or an outage) and is transient
PERMANENT_HTTP_STATUS = frozenset({400, 413, 415, 422})


def http_kind(status: int) -> str:
    return f"http_{status}"


def permanent_kinds() -> frozenset[str]:
    """Every error_kind that is permanent (for planners that match kinds in bulk)."""
    return PERMANENT_KINDS | {http_kind(status) for status in PERMANENT_HTTP_STATUS}


def is_transient(kind: str | None) -> bool:
    """Whether an error row of this kind is retried by a plain rerun (None: not an error)."""
    if kind is None:
        return False
    if kind.startswith("http_") and kind[5:].isdigit():
        return int(kind[5:]) not in PERMANENT_HTTP_STATUS
    return kind not in PERMANENT_KINDS

