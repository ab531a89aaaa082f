"""Broker addresses: one RabbitMQ node, or the nodes of a cluster.

``ISSUANCE_AMQP_URL`` holds one URL or several separated by ``;`` (the
separator Dramatiq splits on), each with its own credentials and vhost::

    amqp://issuance:pw@rabbit-a:5672/issuance;amqp://issuance:pw@rabbit-b:5672/issuance

``pika.URLParameters`` cannot read such a list (it takes everything after
the first ``/`` for the vhost, ``'/;amqp:'``), so every client (publisher,
page, workers, exporter, dead-letter tools) parses it here. Given a list,
pika tries the nodes in turn and connects to the first that answers.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pika

SEPARATOR = ";"
SCHEMES = ("amqp", "amqps")


class BrokerUrlError(ValueError):
    """The broker URL (list) cannot be used."""


def broker_urls(value: str) -> list[str]:
    """The URLs of ``value``, in order (blank entries skipped)."""
    urls = [part.strip() for part in value.split(SEPARATOR) if part.strip()]
    if not urls:
        raise BrokerUrlError("no broker URL given")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise BrokerUrlError(f"not an amqp:// or amqps:// URL: {redacted(url)!r}")
    return urls


def connection_parameters(
    value: str,
    *,
    start: int = 0,
    heartbeat: int | None = None,
    socket_timeout: float | None = None,
    blocked_connection_timeout: float | None = None,
) -> list[pika.URLParameters]:
    """pika parameters for each URL of ``value``, beginning with the one at
    index ``start`` (modulo their number) and wrapping round: a client that
    lost node k asks for ``start=k + 1`` and tries the others first."""
    urls = broker_urls(value)
    first = start % len(urls)
    parameters = []
    for url in urls[first:] + urls[:first]:
        params = pika.URLParameters(url)
        if heartbeat is not None:
            params.heartbeat = heartbeat
        if socket_timeout is not None:
            params.socket_timeout = socket_timeout
        if blocked_connection_timeout is not None:
            params.blocked_connection_timeout = blocked_connection_timeout
        parameters.append(params)
    return parameters


def connect(value: str, *, socket_timeout: float | None = None) -> pika.BlockingConnection:
    """A blocking connection to the first node of ``value`` that answers."""
    return pika.BlockingConnection(connection_parameters(value, socket_timeout=socket_timeout))


def redacted(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def node_name(params: pika.ConnectionParameters) -> str:
    """``host:port`` of a node, for logs."""
    return f"{params.host}:{params.port}"
