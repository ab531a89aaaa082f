"""The page's ASGI layer: what every answer carries, on the claim
endpoint's direct path as on the routed ones."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from issuance.producers.web.app import JSON, not_found, server_error
from issuance.producers.web.edge import CLAIMS_PATH, PageEdge
from issuance.producers.web.security import SECURITY_HEADERS, BodyTooLarge
from issuance.producers.web.server import PageHttpProtocol
from issuance.shared.metrics import WEB_REQUESTS
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def claim(request: Request) -> Response:
    try:
        body = await request.body()
    except BodyTooLarge:
        return JSON({"status": "invalid", "message": "the request is too large"}, 413)
    if body == b"crash":
        raise RuntimeError("a bug")
    return JSON({"status": "accepted", "size": len(body)}, 202, headers={"x-claim": "1"})


async def page(_request: Request) -> Response:
    return Response("<p>page</p>", media_type="text/html")


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """The layer around the page's error handlers and a stub claim
    endpoint, under uvicorn in a thread."""
    routes = [Route(CLAIMS_PATH, claim, methods=["POST"]), Route("/a/page", page, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 500: server_error})
    app.add_middleware(PageEdge, claims=(claim, routes[0]))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", http=PageHttpProtocol)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            http.port = port  # type: ignore[attr-defined]
            yield http
    finally:
        server.should_exit = True
        thread.join(10)


def assert_secured(response: object, api: bool) -> None:
    headers = response.headers  # type: ignore[attr-defined]
    for name, value in SECURITY_HEADERS:
        assert headers[name.decode()] == value.decode()
    assert (headers.get("cache-control") == "no-store") is api


def test_a_claim_answer_carries_its_own_and_the_security_headers(client: httpx.Client) -> None:
    before = WEB_REQUESTS.labels(CLAIMS_PATH, "202")._value.get()
    answer = client.post(CLAIMS_PATH, content=b"12345")
    assert answer.status_code == 202
    assert answer.json() == {"status": "accepted", "size": 5}
    assert answer.headers["x-claim"] == "1"
    assert answer.headers["content-type"] == "application/json"
    assert_secured(answer, api=True)
    assert WEB_REQUESTS.labels(CLAIMS_PATH, "202")._value.get() == before + 1


def test_routed_answers_are_secured_too(client: httpx.Client) -> None:
    assert_secured(client.get("/a/page"), api=False)
    missing = client.get("/api/nowhere")
    assert missing.status_code == 404
    assert_secured(missing, api=True)
    wrong_method = client.get(CLAIMS_PATH)  # only POST takes the direct path
    assert wrong_method.status_code == 405
    assert_secured(wrong_method, api=True)


def test_bodies_over_the_limit_are_refused_declared_or_streamed(client: httpx.Client) -> None:
    declared = client.post(CLAIMS_PATH, content=b"x" * 5000)
    assert declared.status_code == 413
    assert_secured(declared, api=True)
    streamed = client.post(CLAIMS_PATH, content=iter([b"x" * 3000, b"x" * 3000]))  # chunked, no length
    assert streamed.status_code == 413
    assert_secured(streamed, api=True)


def test_a_crash_on_the_direct_path_is_the_busy_answer_and_counted(client: httpx.Client) -> None:
    """The server error handler sits outside the layer, as it did outside
    the middlewares the layer replaces."""
    before = WEB_REQUESTS.labels(CLAIMS_PATH, "500")._value.get()
    crashed = client.post(CLAIMS_PATH, content=b"crash")
    assert crashed.status_code == 500
    assert crashed.json()["status"] == "busy"
    assert WEB_REQUESTS.labels(CLAIMS_PATH, "500")._value.get() == before + 1


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` HTTP answers (each with a content-length) read off ``sock``."""
    data, answers = b"", []
    while len(answers) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(answers)} answers"
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(
                next(
                    line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
                ).split(b":")[1]
            )
            if len(rest) < length:
                break
            answers.append(head + b"\r\n\r\n" + rest[:length])
            data = rest[length:]
    return answers


def test_pipelined_and_closing_requests_get_whole_answers(client: httpx.Client) -> None:
    """Each answer goes out as one write: several on one connection come
    whole and in order, and a request that asks to close still gets its
    answer before the connection ends."""
    post = (
        f"POST {CLAIMS_PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        "content-length: 3\r\n\r\nabc"
    ).encode()
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as sock:  # type: ignore[attr-defined]
        sock.sendall(post * 5)
        answers = read_answers(sock, 5)
        assert all(a.startswith(b"HTTP/1.1 202") and a.endswith(b'"size":3}') for a in answers)
        sock.sendall(b"GET /a/page HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        (last,) = read_answers(sock, 1)
        assert last.startswith(b"HTTP/1.1 200") and last.endswith(b"<p>page</p>")
        assert sock.recv(1) == b""  # then closed
