"""One writer per stage and workdir on object storage: a lease object.

Two runs writing one workdir would duplicate rows (each plans the same keys). Locally an
flock gives the rule (store.exclusive); S3 has no locks, so the run creates the object
`WORKDIR/.<stage>.lease` with a conditional PUT (If-None-Match: *), which the store lets only
one writer win. The lease says who holds it and until when; the holder renews it every TTL/3
with a PUT conditional on its own ETag (If-Match), so it notices at once if it lost the lease.
A run that finds a lease refuses to start, naming the holder and when the lease expires; a
holder killed without a goodbye (SIGKILL, a lost node) leaves a lease that expires TTL seconds
after its last renewal, and a later run takes it over with a PUT conditional on the expired
lease's ETag, so two runs cannot both take it over. Every output write checks that its lease is
still held and unexpired (`check_writes`), so a run that lost its lease (a long pause, a
partition) stops before writing a row that the new holder may also write.

Implemented for s3:// (AWS and S3-compatible stores that honour conditional PUTs: MinIO, R2,
moto). Expiry compares the holder's clock with the reader's: keep clocks in sync (NTP).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid

from pipelines.storage import Loc

LEASE_TTL_S = 60.0   # a killed run's lease blocks a new run for at most this long


class LeaseLostError(RuntimeError):
    """The run no longer holds its lease: another run may be writing; this one stops."""


def ttl_s() -> float:
    return float(os.environ.get("LECCR_LEASE_TTL_S", LEASE_TTL_S))


class S3Lease:
    def __init__(self, workdir: Loc, stage: str):
        import boto3
        from botocore.config import Config
        self.workdir, self.stage, self.ttl = workdir, stage, ttl_s()
        self.uri = f"{workdir.uri}/.{stage}.lease"
        self.bucket, _, prefix = workdir.path.partition("/")
        self.key = f"{prefix}/.{stage}.lease" if prefix else f".{stage}.lease"
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}))
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.expires = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking and giving back
    def acquire(self) -> None:
        from pipelines.store import StageInputError
        try:
            self._put(IfNoneMatch="*")
        except self.client.exceptions.ClientError as err:
            if not _precondition_failed(err):
                raise
            current, etag = self._read()
            if current is None:           # released between our PUT and our GET: try once more
                return self.acquire()
            if current.get("expires_at", 0) > time.time():
                raise StageInputError(self._held_message(current)) from None
            try:                          # expired: take it over, unless another run just did
                self._put(IfMatch=etag)
            except self.client.exceptions.ClientError as err2:
                if _precondition_failed(err2):
                    raise StageInputError(f"another `{self.stage}` run took over the expired lease {self.uri} "
                                          f"just now; wait for it to finish") from None
                raise
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.stage}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self.etag is not None:
            try:   # only our own lease: a run that took over an expired one keeps its
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except self.client.exceptions.ClientError:
                pass

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is still ours and unexpired."""
        if self.lost is None and time.time() >= self.expires:
            self.lost = f"it expired at {_when(self.expires)} without a renewal reaching the store"
        if self.lost is not None:
            raise LeaseLostError(f"this `{self.stage}` run lost its lease {self.uri}: {self.lost}; it stopped "
                                 f"writing. Rows written so far count; rerun when the other run has finished")

    # ------------------------------------------------------------------ internals
    def _put(self, **condition) -> None:
        now = time.time()
        body = {"stage": self.stage, "holder": self.holder, "renewed_at": _when(now),
                "expires_at": now + self.ttl, "ttl_s": self.ttl}
        answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(body).encode(),
                                        ContentType="application/json", **condition)
        self.etag, self.expires = answer["ETag"], now + self.ttl

    def _read(self) -> tuple[dict | None, str | None]:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        try:
            return json.loads(answer["Body"].read()), answer["ETag"]
        except ValueError:   # not ours (or cut): treat it as held until it is old enough
            return {"holder": "unknown (unreadable lease)",
                    "expires_at": answer["LastModified"].timestamp() + self.ttl}, answer["ETag"]

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._put(IfMatch=self.etag)
            except self.client.exceptions.ClientError as err:
                if _precondition_failed(err):
                    current, _ = self._read()
                    holder = (current or {}).get("holder", "nobody")
                    self.lost = f"it was taken over (now held by {holder})"
                    return
            except Exception:   # noqa: BLE001 - the store unreachable: try again; check() sees expiry
                continue

    def _held_message(self, current: dict) -> str:
        left = max(0, current["expires_at"] - time.time())
        return (f"another `{self.stage}` run holds {self.uri} (holder {current.get('holder')}, renewed "
                f"{current.get('renewed_at', '?')}); wait for it to finish. If that run is dead, its lease "
                f"expires in {left:.0f} s (at {_when(current['expires_at'])}) and a rerun then takes over")


def _precondition_failed(err) -> bool:
    # 412: the condition failed; 409: a concurrent conditional write to the same key won
    code = err.response.get("Error", {}).get("Code")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------- the leases of this process

_held: list[S3Lease] = []


def check_writes(target: Loc) -> None:
    """Before a write into a leased workdir: the lease must still be held (LeaseLostError)."""
    for lease in _held:
        if target.scheme == lease.workdir.scheme and target.path.startswith(lease.workdir.path.rstrip("/") + "/"):
            lease.check()


def hold(workdir: Loc, stage: str) -> S3Lease:
    from pipelines.store import StageInputError
    if workdir.scheme != "s3":
        raise StageInputError(f"a workdir on {workdir.scheme}:// needs a writer lease (one run per workdir), which "
                              f"leccr-pipe implements for local folders and s3:// (S3 and S3-compatible stores) only. "
                              f"Inputs and media can be on {workdir.scheme}://; keep the workdir local or on s3://")
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise StageInputError("a workdir on s3:// needs boto3 for its writer lease: "
                              "pip install 'leccr-pipe[s3]'") from None
    lease = S3Lease(workdir, stage)
    lease.acquire()
    _held.append(lease)
    return lease


def give_back(lease: S3Lease) -> None:
    _held.remove(lease)
    lease.release()
