"""Bounded before anything else: every request body is capped (size, and depth for every JSON type) before
authentication and parsing, whatever its content type; the sign-in form takes only a small urlencoded
body; an upload's body is not read before its key is checked; requests in flight are counted per
resolved key (every spelling of the Authorization header, and the web session, count as the key) and
per client address when there is no valid key; CPU-heavy work (pre-flights, submissions, curves) is
limited per tenant and stops when its client goes away.

Most requests here go straight to the ASGI application (`Raw`), so that a test controls the body chunk by
chunk, sees how much of it the application read, holds a request in flight, or leaves before the answer,
and picks the client's address."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from api.cpu_worker import network_cache
from api.main import create_app
from core.settings import Settings

from .conftest import TestClient, create_key

CHUNK = 64 * 1024
ORIGIN = "http://testserver"
DEEP = ('{"spec": ' + '{"a": ' * 900 + "1" + "}" * 900 + "}").encode()
WIDE = {"preset": "cifar10-resnet18", "spec": {"student": "wrn70_16", "peer": "wrn70_16", "epochs": 3, "lr_decay_epochs": [2]}}


class Raw:
    """One request straight to the ASGI app: `chunks` are its body (`more`: the body never ends; the request
    waits for more until `let_go`), from `address`; `disconnect_after` seconds after its body the client
    leaves. After the call: `status`, `headers`, `body`, and `read`, the body chunks the app asked for."""

    def __init__(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        chunks: Sequence[bytes] | Iterator[bytes] = (),
        *,
        more: bool = False,
        address: str = "198.51.100.1",
        disconnect_after: float | None = None,
    ):
        self.method, self.path, self.address = method, path, address
        self.request_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.chunks = iter(chunks)
        self.more, self.disconnect_after = more, disconnect_after
        self.read = 0
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.finished = False
        self.returned = False
        self._gate: asyncio.Event | None = None

    async def __call__(self, app) -> Raw:
        self._gate = gate = asyncio.Event()
        path, _, query = self.path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", b"testserver"), *self.request_headers],
            "client": (self.address, 40000),
            "server": ("testserver", 80),
        }
        pending = next(self.chunks, b"")  # a request without a body is one empty message, as servers send it

        async def receive() -> dict:
            nonlocal pending
            if pending is not None:
                chunk, pending = pending, next(self.chunks, None)
                self.read += 1
                return {"type": "http.request", "body": chunk, "more_body": self.more or pending is not None}
            if self.disconnect_after is not None:
                await asyncio.sleep(self.disconnect_after)
                return {"type": "http.disconnect"}
            await gate.wait()  # a body that never ends, or after it: until the answer is sent or the test lets go
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")
                if not message.get("more_body", False):
                    self.finished = True
                    gate.set()

        try:
            await app(scope, receive, send)
        finally:
            self.returned = True
        return self

    def let_go(self) -> None:
        """(In the app's event loop) the held request's client leaves."""
        assert self._gate is not None
        self._gate.set()

    def json(self) -> dict:
        import json

        return json.loads(self.body)


def megabytes(n: int, piece: bytes = b"x") -> Iterator[bytes]:
    chunk = piece * (CHUNK // len(piece))
    for _ in range(n * 1024 * 1024 // CHUNK):
        yield chunk


@pytest.fixture(scope="module")
def bounded(settings: Settings):
    """An app with small in-flight limits, entered (one event loop, its portal for raw requests), and a key."""
    small = settings.model_copy(
        update={
            "key_max_in_flight": 3,
            "session_max_in_flight": 2,
            "address_max_in_flight": 2,
            "tenant_max_cpu_work": 2,
            "refusal_delay_seconds": 0,  # answered at once here; held back in its own test
        }
    )
    app = create_app(small)
    key = create_key(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        yield app, client, key


def send(client: TestClient, app, raw: Raw) -> Raw:
    return client.portal.call(raw, app)


def start(client: TestClient, app, raw: Raw):
    """The request in the background, in the app's event loop; returns its future."""
    return client.portal.start_task_soon(raw, app)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def holding(client: TestClient, app, *held: Raw) -> Iterator[None]:
    """The requests started and in flight (their first chunk read) inside the block; let go at its end, whatever happens."""
    for raw in held:
        start(client, app, raw)
    try:
        wait_for(lambda: all(r.read for r in held), f"{len(held)} requests in flight")
        yield
    finally:
        for raw in held:
            client.portal.call(lambda r=raw: r.let_go())
        wait_for(lambda: all(r.returned for r in held), "the held requests to end")


# bodies: capped whatever their content type, before the key is looked at


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/octet-stream", "application/xml", "application/vnd.peeraid+json", "multipart/form-data; boundary=b"],
)
def test_a_declared_body_over_the_cap_is_413_unread_whatever_its_type(bounded, settings, content_type):
    app, client, _ = bounded
    headers = {"Content-Length": str(400 * 1024 * 1024)} | ({"Content-Type": content_type} if content_type else {})
    for path in ("/v1/jobs/preflight", "/v1/jobs", "/v1/jobs/job_x/cancel", "/ui/login"):
        raw = send(client, app, Raw("POST", path, headers, megabytes(4)))  # no key
        assert raw.status == 413, (path, content_type, raw.status, raw.body[:200])
        assert raw.read == 0, f"{path}: {raw.read} chunks read before refusing"
        assert "request body over" in raw.json()["detail"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/problem+json; charset=utf-8", None])
def test_a_chunked_body_is_cut_at_the_cap(bounded, settings, content_type):
    app, client, key = bounded
    for headers in ({}, {"Authorization": f"Bearer {key}"}):
        headers = {**headers, "Transfer-Encoding": "chunked"} | ({"Content-Type": content_type} if content_type else {})
        raw = send(client, app, Raw("POST", "/v1/jobs/preflight", headers, megabytes(8, b"[")))
        assert raw.status == 413, (content_type, raw.status, raw.body[:200])
        assert raw.read * CHUNK <= settings.max_json_bytes + CHUNK, f"{raw.read} chunks read: the cap is {settings.max_json_bytes} bytes"


@pytest.mark.parametrize(
    "content_type", ["application/json", "Application/JSON; charset=utf-8", "application/problem+json", "application/vnd.peeraid.v1+json"]
)
def test_every_json_type_is_depth_checked_and_capped(bounded, settings, content_type):
    app, client, key = bounded
    auth = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    deep = send(client, app, Raw("POST", "/v1/jobs/preflight", {**auth, "Content-Length": str(len(DEEP))}, [DEEP]))
    assert deep.status == 422 and "nested deeper than 32" in deep.json()["detail"], (deep.status, deep.body[:300])
    big = b'{"preset": "digits-demo", "spec": {' + b", ".join(b'"k%d": %d' % (i, i) for i in range(600_000)) + b"}}"
    assert len(big) > 8_000_000
    pieces = [big[i : i + CHUNK] for i in range(0, len(big), CHUNK)]
    oversized = send(client, app, Raw("POST", "/v1/jobs/preflight", {**auth, "Content-Length": str(len(big))}, pieces))
    assert oversized.status == 413 and oversized.read == 0, (oversized.status, oversized.read)
    fine = send(client, app, Raw("POST", "/v1/jobs/preflight", auth, [b'{"preset": "digits-demo"}']))
    assert fine.status == 200 and fine.json()["admitted"], fine.body[:300]


def test_the_sign_in_form_takes_only_a_small_urlencoded_body(bounded):
    app, client, key = bounded
    origin = {"Origin": ORIGIN}
    boundary = "b" * 300
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="api_key"; filename="k"\r\n\r\n'.encode()
    for content_type in (f"multipart/form-data; boundary={boundary}", "multipart/form-data; boundary=x", "application/json", "text/plain"):
        raw = send(client, app, Raw("POST", "/ui/login", {**origin, "Content-Type": content_type}, [part, *megabytes(4)]))
        assert raw.status == 415, (content_type, raw.status, raw.body[:300])
        assert raw.read == 0 and "application/x-www-form-urlencoded" in raw.json()["detail"]
    padded = f"api_key={key}&pad={'x' * 10_000}".encode()
    raw = send(client, app, Raw("POST", "/ui/login", {**origin, "Content-Type": "application/x-www-form-urlencoded"}, [padded]))
    assert raw.status == 413, (raw.status, raw.body[:300])
    signed_in = client.post("/ui/login", data={"api_key": key}, headers=origin, follow_redirects=False)
    assert signed_in.status_code == 303, signed_in.text


def test_an_upload_is_not_read_before_its_key_is_checked(bounded):
    app, client, _ = bounded
    for auth in ({}, {"Authorization": "Bearer pk_zzzzzzzz_wrong"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        for content_type in ("application/octet-stream", "multipart/form-data; boundary=x"):
            headers = {**auth, "Content-Type": content_type, "Content-Length": str(2 * 1024**3)}
            raw = send(client, app, Raw("POST", "/v1/datasets?name=x", headers, megabytes(4)))
            assert raw.status == 401 and raw.read == 0, (auth, content_type, raw.status, raw.read)


# requests in flight: per resolved key, web session included; per address without a valid key


SPELLINGS = ("Bearer {}", "bearer {}", "BEARER {}", "Bearer   {}  ", " \tbEaReR\t{}")


def held_preflight(headers: dict[str, str], address: str = "198.51.100.1") -> Raw:
    """A pre-flight whose JSON body never finishes arriving: it is in flight until let go."""
    return Raw("POST", "/v1/jobs/preflight", {**headers, "Content-Type": "application/json"}, [b'{"preset": '], more=True, address=address)


def test_every_spelling_of_a_key_is_that_key_and_shares_its_in_flight_limit(bounded, settings):
    app, client, _ = bounded
    key = create_key(settings)
    for spelling in SPELLINGS:
        response = client.get("/v1/jobs", headers={"Authorization": spelling.format(key)})
        assert response.status_code == 200, (spelling, response.text)
    with holding(client, app, *(held_preflight({"Authorization": spelling.format(key)}) for spelling in SPELLINGS[:3])):
        for spelling in SPELLINGS:
            refused = client.get("/v1/jobs", headers={"Authorization": spelling.format(key)})
            assert refused.status_code == 429, (spelling, refused.status_code)
            assert "in flight with this API key (limit 3" in refused.json()["detail"] and refused.headers["retry-after"] == "1"
        assert client.get("/v1/jobs").status_code == 200  # another key is not held up
    assert client.get("/v1/jobs", headers={"Authorization": SPELLINGS[1].format(key)}).status_code == 200


def test_requests_without_a_valid_key_are_limited_by_address(bounded):
    app, client, key = bounded
    here, elsewhere = "198.51.100.20", "198.51.100.21"
    assert client.get("/v1/jobs").status_code == 200  # the key is known: looked up again freely, whatever its address's load
    with holding(client, app, held_preflight({}, here), held_preflight({"Authorization": "Bearer pk_zzzzzzzz_wrong"}, here)):
        refused = send(client, app, Raw("GET", "/v1/jobs", address=here))
        assert refused.status == 429 and "without a valid API key from this address (limit 2)" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"
        wrong_key = send(client, app, Raw("GET", "/v1/jobs", {"Authorization": "Bearer pk_yyyyyyyy_wrong"}, address=here))
        assert wrong_key.status == 429
        assert send(client, app, Raw("GET", "/v1/jobs", address=elsewhere)).status == 401
        assert send(client, app, Raw("GET", "/healthz", address=here)).status == 200  # liveness probes are never refused
        assert send(client, app, Raw("GET", "/v1/jobs", {"Authorization": f"bearer {key}"}, address=here)).status == 200
    assert send(client, app, Raw("GET", "/v1/jobs", address=here)).status == 401


def test_web_session_requests_count_as_their_key_and_have_a_browsers_share(bounded, settings):
    app, client, _ = bounded
    key = create_key(settings)
    form = {"Origin": ORIGIN, "Content-Type": "application/x-www-form-urlencoded"}
    signed_in = send(client, app, Raw("POST", "/ui/login", form, [f"api_key={key}".encode()]))
    assert signed_in.status == 303, signed_in.body[:300]
    cookie = {"Cookie": signed_in.headers["set-cookie"].split(";", 1)[0]}
    assert send(client, app, Raw("GET", "/ui/jobs", cookie)).status == 200
    bearer = {"Authorization": f"Bearer {key}"}

    def web() -> Raw:  # a web request whose body never ends
        return Raw("POST", "/ui/logout", {**cookie, **form}, [b"x="], more=True)

    with holding(client, app, web(), web()):  # the sessions' limit (2) reached; the key's (3) not yet
        refused = send(client, app, Raw("GET", "/ui/jobs", cookie))
        assert refused.status == 429 and "web pages in flight for this API key's sessions (limit 2)" in refused.json()["detail"]
        assert send(client, app, Raw("GET", "/v1/jobs", bearer)).status == 200
        with holding(client, app, held_preflight(bearer)):  # and now the key's
            by_key = send(client, app, Raw("GET", "/v1/jobs", bearer))
            assert by_key.status == 429 and "in flight with this API key (limit 3" in by_key.json()["detail"]
    with holding(client, app, *(held_preflight(bearer) for _ in range(3))):
        assert send(client, app, Raw("GET", "/ui/jobs", cookie)).status == 429
    assert send(client, app, Raw("GET", "/ui/jobs", cookie)).status == 200  # let go before their bodies ended: still signed in


def test_a_refusal_is_held_back_so_that_retrying_at_once_cannot_spin(settings):
    app = create_app(settings.model_copy(update={"key_max_in_flight": 1, "refusal_delay_seconds": 0.3}))
    key = create_key(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        with holding(client, app, held_preflight({"Authorization": f"Bearer {key}"})):
            started = time.perf_counter()
            refused = client.get("/v1/jobs")
            assert refused.status_code == 429 and time.perf_counter() - started >= 0.3
        started = time.perf_counter()
        assert client.get("/v1/jobs").status_code == 200 and time.perf_counter() - started < 0.3


# CPU-heavy work: per tenant, cancelled when the client leaves, deterministic parts cached


def networks_counted(app) -> list:
    """The workers' caches of network measures (hits, misses, currsize), one per worker process."""
    return app.state.cpu_work.pool.each(network_cache)


def forget_networks(app) -> None:
    app.state.cpu_work.pool.each(network_cache, True)


def test_cpu_heavy_requests_are_limited_per_tenant(bounded, settings):
    app, client, _ = bounded
    key = create_key(settings)
    tenant_of = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    forget_networks(app)  # cold: each pre-flight builds and counts two WRN-70-16s
    body = b'{"preset": "tinyimagenet-wrn34-10", "spec": {"student": "wrn70_16", "peer": "wrn70_16"}}'
    running = [Raw("POST", "/v1/jobs/preflight", tenant_of, [body]) for _ in range(2)]
    futures = [start(client, app, raw) for raw in running]
    cpu_work = app.state.cpu_work
    wait_for(lambda: sum(cpu_work.slots.held.values()) == 2 or any(r.finished for r in running), "two pre-flights running")
    assert not any(r.finished for r in running), "the pre-flights finished too soon to test their limit"
    for path in ("/v1/jobs/preflight", "/v1/jobs"):
        refused = send(client, app, Raw("POST", path, tenant_of, [b'{"preset": "digits-demo"}']))
        assert refused.status == 429, (path, refused.status, refused.body[:300])
        assert "CPU-heavy requests at once (limit 2 per tenant)" in refused.json()["detail"] and refused.headers["retry-after"] == "1"
    other = client.post("/v1/jobs/preflight", json={"preset": "digits-demo"})
    assert other.status_code == 200, other.text  # another tenant is not refused
    for future in futures:
        assert future.result(timeout=120).status == 200
    assert not cpu_work.slots.held
    assert send(client, app, Raw("POST", "/v1/jobs/preflight", tenant_of, [body])).status == 200


def test_a_preflight_stops_when_its_client_goes_away(bounded, settings):
    app, client, key = bounded
    forget_networks(app)
    body = b'{"preset": "tinyimagenet-wrn34-10", "spec": {"student": "wrn70_16", "peer": "wrn70_16"}}'
    cancelled = app.state.cpu_work.cancelled
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    started = time.perf_counter()
    raw = send(client, app, Raw("POST", "/v1/jobs/preflight", headers, [body], disconnect_after=0.05))
    left = time.perf_counter() - started
    assert app.state.cpu_work.cancelled == cancelled + 1 and raw.status == 499, raw.status
    assert all(info["currsize"] == 0 for info in networks_counted(app)), "the work went on to the end"
    assert not app.state.cpu_work.slots.held  # the tenant's slot came back once the work had stopped
    finished = send(client, app, Raw("POST", "/v1/jobs/preflight", headers, [body]))
    assert finished.status == 200
    assert left < 10, left


def test_repeated_preflights_reuse_each_networks_measures(bounded):
    app, client, _ = bounded
    forget_networks(app)

    def preflight(epochs: int) -> tuple[float, dict]:
        started = time.perf_counter()
        response = client.post("/v1/jobs/preflight", json={**WIDE, "spec": {**WIDE["spec"], "epochs": epochs}})
        assert response.status_code == 200, response.text
        return time.perf_counter() - started, response.json()["estimate"]

    cold, first = preflight(3)
    warm, again = preflight(30)
    counted = networks_counted(app)
    assert sum(info["hits"] for info in counted) >= 2 and sum(info["currsize"] for info in counted) == 1, counted
    assert again["student_parameters"] == first["student_parameters"] and again["training_flops"] > 9 * first["training_flops"]
    assert warm < cold / 4, (cold, warm)


def test_curves_are_rendered_once_per_change(finished):
    from api.routes import curves

    owner, _, job = finished
    curves.RENDERED.clear()
    first = owner.get(f"/v1/jobs/{job['id']}/curves.png")
    assert first.status_code == 200 and len(curves.RENDERED) == 1
    again = owner.get(f"/v1/jobs/{job['id']}/curves.png")
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"] and len(curves.RENDERED) == 1


def test_what_is_loaded_at_start_up_is_out_of_the_garbage_collectors_reach(settings):
    """A full collection stops the event loop for as long as it takes: over the 350,000 objects torch and the
    rest leave at start-up, 200-500 ms on this machine (the other tenant's p99 during the pre-flight attack)."""
    import gc

    gc.unfreeze()
    with TestClient(create_app(settings)):
        frozen = gc.get_freeze_count()
    assert frozen > 100_000, frozen


def test_the_cpu_workers_run_below_the_apis_priority(bounded):
    """On cores the API shares with its workers, the event loop is scheduled ahead of a pre-flight's arithmetic."""
    import os

    app, client, _ = bounded
    assert client.post("/v1/jobs/preflight", json={"preset": "digits-demo"}).status_code == 200
    own = os.nice(0)
    assert all(niceness >= own + 10 for niceness in app.state.cpu_work.pool.each(os.nice, 0))
