"""The SDK: one method per REST endpoint, typed errors, safe retries, streamed uploads and
checksum-verified downloads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from . import __version__
from .config import key_hint, resolve_settings
from .errors import (
    AuthenticationError,
    ChecksumMismatch,
    ConnectionFailed,
    NotFound,
    PeeraidError,
    ServerError,
    error_from_response,
)
from .progress import TERMINAL_STATUSES, JobProgressBar

JSON = dict[str, Any]
UPLOAD_CHUNK = 1 << 20
DOWNLOAD_CHUNK = 1 << 20
# The service sends a keep-alive every 15 s on an event stream, so this much silence means the connection is gone.
STREAM_READ_TIMEOUT = 60.0
# The artifacts of a finished job (the service's core.engine.artifacts.ARTIFACTS; tests keep the two in step).
ARTIFACT_NAMES = (
    "student",
    "swa_student",
    "peer",
    "last_student",
    "student_onnx",
    "student_pt2",
    "swa_student_onnx",
    "swa_student_pt2",
    "model_card",
    "model_card_markdown",
)
# Failures after which a request may be sent again: nothing was answered. Bad URLs and the like are not retried.
_RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_UNSAFE_FILE_NAME = re.compile(r"[^\w.\- ]")


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """Server-sent events as (event, data); data is JSON-decoded where it parses. Comments are skipped."""
    event = ""
    data: list[str] = []
    for line in lines:
        if not line:
            if data or event:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text) if text else None
                except ValueError:
                    value = text
                yield event or "message", value
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value_text = line.partition(":")
        value_text = value_text.removeprefix(" ")
        if field == "event":
            event = value_text
        elif field == "data":
            data.append(value_text)


def _q(path_segment: str) -> str:
    return quote(path_segment, safe="")


def _safe_file_name(name: str) -> str:
    """The upload's file name as the service accepts it (letters, digits, '.', '-', '_', spaces)."""
    return _UNSAFE_FILE_NAME.sub("_", name)[:200] or "upload"


class Client:
    """A client for one service and one API key.

    `url` and `api_key` default to $PEERAID_URL / $PEERAID_API_KEY, then the config file
    (see `peeraid_client.config`), then http://127.0.0.1:8000 and no key.
    Idempotent reads and job submission (made idempotent with an Idempotency-Key) are retried
    `retries` times on connection failures and 5xx answers, waiting backoff × 2^attempt seconds; an
    event stream that breaks is reconnected as many times in a row. `stream_read_timeout`: seconds an
    event stream may stay silent before its connection counts as lost (default: 60, or `timeout` if
    longer; the service sends a keep-alive every 15 s)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        stream_read_timeout: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        settings = resolve_settings(url, api_key)
        self.url = settings.url
        self.api_key = settings.api_key
        self.api_key_source = settings.api_key_source
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.stream_read_timeout = stream_read_timeout or max(timeout, STREAM_READ_TIMEOUT)
        headers = {"User-Agent": f"peeraid-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    # --- transport -------------------------------------------------------------------------------

    def _connection_failed(self, err: Exception) -> ConnectionFailed:
        message = f"cannot reach the service at {self.url}: {type(err).__name__}: {err}".rstrip(": ")
        if self.api_key:  # a transport's message may quote the request's headers
            message = message.replace(self.api_key, key_hint(self.api_key))
        return ConnectionFailed(None, message)

    def _error(self, response: httpx.Response) -> PeeraidError:
        """The typed error of a 4xx/5xx answer (its body read); a refused key is said in words, by its prefix."""
        error = error_from_response(response)
        if isinstance(error, AuthenticationError) and self.api_key:
            source = {"argument": "the api_key argument"}.get(self.api_key_source or "", self.api_key_source)
            error.message = f"the API key was refused ({key_hint(self.api_key)}, from {source}): it is mistyped or was revoked"
        return error

    def _request(self, method: str, path: str, *, retry: bool = False, **kwargs: Any) -> httpx.Response:
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._http.request(method, path, **kwargs)
            except _RETRYABLE as err:
                if last:
                    raise self._connection_failed(err) from err
            except httpx.HTTPError as err:
                raise self._connection_failed(err) from err
            else:
                if response.status_code < 400:
                    return response
                if response.status_code < 500 or last:
                    raise self._error(response)
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        return response.json() if response.content else None

    @contextlib.contextmanager
    def _stream(self, path: str, timeout: httpx.Timeout | None = None) -> Iterator[httpx.Response]:
        """A streamed GET whose errors are typed; a broken connection while reading is ConnectionFailed."""
        try:
            with self._http.stream("GET", path, timeout=timeout or self.timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                yield response
        except httpx.HTTPError as err:
            raise self._connection_failed(err) from err

    # --- datasets --------------------------------------------------------------------------------

    def upload_dataset(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        resize: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> JSON:
        """Upload a .npz or a .zip / .tar / .tar.gz of class folders, streamed from disk. `resize="32x32"`
        (WIDTHxHEIGHT) resizes every image, for datasets whose images differ in size.
        `on_progress(sent, total)` is called after each chunk. Not retried: the body is a one-shot stream.
        Names are unique among your datasets: a name you already use raises Conflict, naming the dataset
        that has it (before the file is sent, where the name is known)."""
        path = Path(path)
        try:
            file = path.open("rb")
        except OSError as err:
            raise PeeraidError(None, f"{path}: {err.strerror}") from None
        with file:
            total = os.fstat(file.fileno()).st_size

            def chunks(f: BinaryIO = file) -> Iterator[bytes]:
                sent = 0
                while chunk := f.read(UPLOAD_CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if on_progress is not None:
                        on_progress(sent, total)

            return self._json(
                "POST",
                "/v1/datasets",
                params={"name": name or path.stem.removesuffix(".tar"), "filename": _safe_file_name(path.name)}
                | ({"resize": resize} if resize else {}),
                content=chunks(),
                # an explicit length lets the service refuse an oversized file before it is sent
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(total)},
                # the service checks the whole file before it answers
                timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 1800.0)),
            )

    def list_datasets(self) -> list[JSON]:
        return self._json("GET", "/v1/datasets", retry=True)["items"]

    def get_dataset(self, dataset_id: str) -> JSON:
        return self._json("GET", f"/v1/datasets/{_q(dataset_id)}", retry=True)

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{_q(dataset_id)}")

    # --- catalog ---------------------------------------------------------------------------------

    def list_architectures(self) -> list[JSON]:
        return self._json("GET", "/v1/architectures", retry=True)

    def list_presets(self) -> list[JSON]:
        return self._json("GET", "/v1/presets", retry=True)

    # --- jobs ------------------------------------------------------------------------------------

    def submit_job(
        self, preset: str | None = None, dataset: str | None = None, spec: JSON | None = None, idempotency_key: str | None = None
    ) -> JSON:
        """Create a job. Every retry carries the same Idempotency-Key, so at most one job is created."""
        body: JSON = {"spec": spec or {}}
        if preset is not None:
            body["preset"] = preset
        if dataset is not None:
            body["dataset"] = dataset
        key = idempotency_key or str(uuid.uuid4())
        return self._json("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, retry=True)

    def preflight_job(self, preset: str | None = None, dataset: str | None = None, spec: JSON | None = None) -> JSON:
        """What submit_job would do, without submitting: {"admitted", "spec" (resolved), "estimate" (memory,
        hours per device class, warnings), "refusals" [{field, message}]}."""
        body: JSON = {"spec": spec or {}}
        if preset is not None:
            body["preset"] = preset
        if dataset is not None:
            body["dataset"] = dataset
        return self._json("POST", "/v1/jobs/preflight", json=body, retry=True)

    def list_jobs(self, status: str | None = None, limit: int = 50, offset: int = 0) -> JSON:
        """One page, newest first: {"items": [...], "total", "limit", "offset"}."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._json("GET", "/v1/jobs", params=params, retry=True)

    def get_job(self, job_id: str) -> JSON:
        return self._json("GET", f"/v1/jobs/{_q(job_id)}", retry=True)

    def job_metrics(self, job_id: str) -> list[JSON]:
        """Per-epoch records: [{"epoch", "attempt", "record": {...}}]."""
        return self._json("GET", f"/v1/jobs/{_q(job_id)}/metrics", retry=True)

    def cancel_job(self, job_id: str) -> JSON:
        return self._json("POST", f"/v1/jobs/{_q(job_id)}/cancel")

    def delete_job(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{_q(job_id)}")

    def events(self, job_id: str) -> Iterator[tuple[str, Any]]:
        """The job's server-sent events: ("job", job) on every change, then ("end", {"status"}); or
        ("deleted", {}) if the job is deleted, ("error", {"detail"}) if the API key is revoked.

        A stream that breaks (a dropped connection, a restarted service, silence past
        `stream_read_timeout`) is reconnected, up to `retries` times in a row with backoff, and resumed:
        the service starts again with the job's current state, which is yielded only if it is new."""
        last_update: Any = None
        failures = 0
        while True:
            try:
                for event, data in self._sse(job_id, read_timeout=self.stream_read_timeout):
                    failures = 0
                    if event == "job" and isinstance(data, dict):
                        if last_update is not None and data.get("updated_at") == last_update:
                            continue  # the state we had before the reconnection
                        last_update = data.get("updated_at")
                    yield event, data
                    if event in ("end", "deleted", "error"):
                        return
                error: PeeraidError = ConnectionFailed(None, f"the event stream of job {job_id} ended before the job did")
            except (ConnectionFailed, ServerError) as err:
                error = err
            failures += 1
            if failures > self.retries:
                raise error
            time.sleep(self.backoff * 2**failures)

    def _sse(self, job_id: str, read_timeout: float) -> Iterator[tuple[str, Any]]:
        with self._stream(f"/v1/jobs/{_q(job_id)}/events", timeout=httpx.Timeout(self.timeout, read=read_timeout)) as response:
            yield from parse_sse(response.iter_lines())

    def wait(
        self,
        job_id: str,
        progress: bool = False,
        *,
        stream: bool = True,
        poll_interval: float = 2.0,
        timeout: float | None = None,
    ) -> JSON:
        """Block until the job succeeds, fails or is cancelled and return it. Follows the event stream
        (reconnecting when it breaks) or, with stream=False, polls. progress=True draws a bar on stderr.
        Raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = JobProgressBar(job_id) if progress else None
        try:
            for job in self._follow(job_id, stream, poll_interval, deadline):
                if bar is not None:
                    bar.update(job)
                if job["status"] in TERMINAL_STATUSES:
                    return job
        finally:
            if bar is not None:
                bar.close()
        raise AssertionError("unreachable")

    def _follow(self, job_id: str, stream: bool, poll_interval: float, deadline: float | None) -> Iterator[JSON]:
        failures = 0
        while True:
            if stream:
                try:
                    read_timeout = self.stream_read_timeout
                    remaining = read_timeout if deadline is None else max(1.0, min(read_timeout, deadline - time.monotonic()))
                    for event, data in self._sse(job_id, read_timeout=remaining):
                        if event == "job":
                            failures = 0
                            yield data
                        elif event == "deleted":
                            raise NotFound(404, f"job {job_id} was deleted")
                        if deadline is not None and time.monotonic() > deadline:
                            break
                except (ConnectionFailed, ServerError):
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} did not finish within the wait timeout") from None
                    failures += 1  # reconnect: the stream starts again with the current state
                    if failures > self.retries:
                        raise
            else:
                yield self.get_job(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within the wait timeout")
            time.sleep(poll_interval if not stream else min(poll_interval, self.backoff * 2**failures))

    # --- artifacts -------------------------------------------------------------------------------

    def list_artifacts(self, job_id: str) -> list[JSON]:
        """[{"name", "file_name", "media_type", "size_bytes", "sha256", "url", ...}]."""
        return self._json("GET", f"/v1/jobs/{_q(job_id)}/artifacts", retry=True)

    def download_artifact(self, job_id: str, name: str, dest: str | os.PathLike[str] | None = None) -> Path:
        """Download one artifact into `dest` (a directory, default the current one, named
        `<job>-<file name>` as the service suggests; or a file path). The bytes go to a temporary
        file beside the destination and are renamed into place only when their size and SHA-256
        match both the listing and the X-Content-SHA256 header; otherwise ChecksumMismatch."""
        listing = {a["name"]: a for a in self.list_artifacts(job_id)}
        if name not in listing:
            known = ", ".join(sorted(listing)) or "none yet"
            raise NotFound(404, f"job {job_id} has no artifact {name!r} (it has: {known})")
        artifact = listing[name]
        target = self._target(dest, f"{job_id}-{artifact['file_name']}")
        return self._download(
            f"/v1/jobs/{_q(job_id)}/artifacts/{_q(name)}", target, expected_size=artifact["size_bytes"], expected_sha256=artifact["sha256"]
        )

    def download_curves(self, job_id: str, path: str | os.PathLike[str] | None = None) -> Path:
        """The job's training curves as a PNG (`GET /v1/jobs/{id}/curves.png`)."""
        return self._download(f"/v1/jobs/{_q(job_id)}/curves.png", self._target(path, f"{job_id}-curves.png"))

    @staticmethod
    def _target(dest: str | os.PathLike[str] | None, default_name: str) -> Path:
        if dest is None:
            return Path.cwd() / default_name
        raw = os.fspath(dest)
        if Path(raw).is_dir() or raw.endswith(("/", os.sep)):  # Path() would drop the trailing slash
            return Path(raw) / default_name
        return Path(raw)

    def _download(self, path: str, target: Path, expected_size: int | None = None, expected_sha256: str | None = None) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / f".{target.name}.{secrets.token_hex(4)}.part"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # not mkstemp: its 0600 would outlive the rename
        try:
            digest, size = hashlib.sha256(), 0
            with (
                os.fdopen(fd, "wb") as out,
                self._stream(path, timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 300.0))) as response,
            ):
                header_sha = response.headers.get("x-content-sha256")
                # a Content-Length of an encoded body counts encoded bytes; only a plain one is comparable
                plain = "content-encoding" not in response.headers and response.headers.get("content-length", "").isdigit()
                header_size = int(response.headers["content-length"]) if plain else None
                if expected_sha256 is not None and header_sha is not None and header_sha != expected_sha256:
                    raise ChecksumMismatch(
                        f"{target.name}: the listing says SHA-256 {expected_sha256} but the download announces {header_sha}",
                        expected_sha256,
                        header_sha,
                    )
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            for what, expected, got in (
                ("size", expected_size, size),
                ("size", header_size, size),
                ("SHA-256", expected_sha256, actual),
                ("SHA-256", header_sha, actual),
            ):
                if expected is not None and expected != got:
                    raise ChecksumMismatch(f"{target.name}: expected {what} {expected}, received {got}; not saved", expected, got)
            if expected_sha256 is not None and header_sha is None:
                raise ChecksumMismatch(f"{target.name}: the service sent no X-Content-SHA256 header; not saved", expected_sha256, None)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return target
