"""Helpers for the activity page's tests: the page under uvicorn in a thread
on the real services, the real workers as a subprocess, and a look into the
RabbitMQ queues."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pika
import uvicorn
from issuance.producers.web import create_app
from issuance.shared.settings import Settings
from issuance.shared.wire import codec
from issuance.shared.wire.messages import ClaimsRequested, Message

from tests.e2e.conftest import Workers, consumers, wait_for


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The page under uvicorn in a thread, on a free local port; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the page did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def page_client(settings: Settings) -> Iterator[httpx.Client]:
    """An HTTP client of the page, posting from the page's own origin."""
    with serve(settings) as url, httpx.Client(base_url=url, headers={"origin": url}, timeout=15) as client:
        yield client


def post_claim(client: httpx.Client, activity: str, phone: str, **extra: Any) -> Any:
    return client.post("/api/claims", json={"activity": activity, "phone": phone, **extra})


def take_messages(settings: Settings, queue: str) -> list[Message]:
    """Everything waiting in ``queue``, acknowledged and decoded (packed
    claims unpacked)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        messages = []
        while True:
            method, _props, body = channel.basic_get(queue)
            if method is None:
                return messages
            envelope = orjson.loads(body)
            message = codec.decode_payload(envelope["actor_name"], envelope["args"][0])
            # The page packs claims that arrive together: count each claim.
            messages.extend(message.claims if isinstance(message, ClaimsRequested) else [message])
            channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()


def purge(settings: Settings) -> None:
    """Empty the queues the page publishes to (the vhost lives for the session)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        for queue in codec.QUEUES:
            channel.queue_declare(queue, durable=True, arguments=codec.queue_arguments(queue))
            channel.queue_purge(queue)
    finally:
        connection.close()


@contextmanager
def workers_running(service_env: dict[str, str], settings: Settings, log: Path) -> Iterator[Workers]:
    """The real Dramatiq workers (one process, four threads) as a subprocess."""
    env = {**os.environ, **service_env, "ISSUANCE_TEST_LOG": str(log)}
    env.pop("PYTEST_CURRENT_TEST", None)
    workers = Workers(env, processes=1, threads=4, queues=None)
    try:
        wait_for(
            lambda: workers.proc.poll() is not None or consumers(settings, "claims") >= 1,
            timeout=60,
            what="workers to consume",
        )
        assert workers.proc.poll() is None, log.read_text()[-3000:]
        yield workers
    finally:
        workers.stop()


def read_status(client: httpx.Client, accepted: dict[str, Any]) -> httpx.Response:
    """A claim's status, read as its claimant: with the token of its accepted answer."""
    return client.get(f"/api/claims/{accepted['claim_id']}", params={"token": accepted["status_token"]})


def settle(client: httpx.Client, *accepted: dict[str, Any], timeout: float = 30) -> list[dict[str, Any]]:
    """The final status of each accepted claim, once the workers have credited or refused it."""

    def final() -> list[dict[str, Any]] | None:
        answers = [read_status(client, answer).json() for answer in accepted]
        return answers if all(a["status"] in ("credited", "refused") for a in answers) else None

    answers: list[dict[str, Any]] = wait_for(final, timeout=timeout, what="claims to be decided")
    return answers
