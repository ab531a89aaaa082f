"""A small TCP fault proxy: what ``tc netem`` would do, in user space.

Each :class:`FaultProxy` listens on its own port and forwards to one target
port. Faults are switched on and off from any thread:

- ``partition(seconds)``: nothing is forwarded either way (bytes wait in the
  proxy like unacknowledged segments), new connections hang; heartbeats
  time out on the far side exactly as through a dead link;
- ``reset()``: every open connection is torn down with a TCP RST;
- ``latency(ms, seconds)``: each chunk is delayed;
- ``keepalive(seconds)`` (an AMQP proxy only): the proxy sends AMQP heartbeat
  frames to the broker on behalf of clients that went quiet, so a client
  frozen by SIGSTOP still looks alive to RabbitMQ: only the consumer timeout,
  not the heartbeat, can then tell that it stopped working. A heartbeat frame
  is inserted only between two whole frames of the client's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from typing import Any

# type 8 (heartbeat), channel 0, size 0, frame-end
AMQP_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class AmqpFrames:
    """Where a client's byte stream stands in AMQP 0-9-1 framing: the 8-byte
    protocol header, then frames of a 7-byte header, a payload of the size it
    names, and a frame-end octet."""

    def __init__(self) -> None:
        self.header_left = 8
        self.head = b""
        self.left = 0
        self.last_write = time.monotonic()

    def feed(self, data: bytes) -> None:
        self.last_write = time.monotonic()
        i = min(self.header_left, len(data))
        self.header_left -= i
        while i < len(data):
            if self.left:
                take = min(self.left, len(data) - i)
                self.left -= take
                i += take
                continue
            chunk = data[i : i + 7 - len(self.head)]
            self.head += chunk
            i += len(chunk)
            if len(self.head) == 7:
                self.left = struct.unpack(">I", self.head[3:7])[0] + 1
                self.head = b""

    def at_boundary(self) -> bool:
        return self.header_left == 0 and self.left == 0 and not self.head


class FaultLoop:
    """One event loop thread serving every proxy of a chaos run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(
        self, faults: FaultLoop, name: str, listen_port: int, target_port: int, *, amqp: bool = False
    ) -> None:
        self.faults = faults
        self.amqp = amqp
        self.keepalive_until = 0.0
        self.heartbeats_sent = 0
        self.streams: dict[asyncio.StreamWriter, AmqpFrames] = {}
        self.name = name
        self.listen_port = listen_port
        self.target_port = target_port
        self.partitioned_until = 0.0
        self.latency_s = 0.0
        self.latency_until = 0.0
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.connections = 0
        self.server: asyncio.Server | None = None
        faults.call(self._start())

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        if self.amqp:
            self.keepalive_task = asyncio.ensure_future(self._keepalive())

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if time.monotonic() >= self.keepalive_until:
                continue
            for upstream, frames in list(self.streams.items()):
                if frames.at_boundary() and time.monotonic() - frames.last_write > 1.0:
                    frames.last_write = time.monotonic()
                    upstream.write(AMQP_HEARTBEAT)
                    self.heartbeats_sent += 1

    def _partitioned(self) -> bool:
        return time.monotonic() < self.partitioned_until

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        while self._partitioned():
            await asyncio.sleep(0.05)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _rst(client_w)
            return
        self.connections += 1
        pair = (client_w, up_w)
        self.pairs.add(pair)
        frames = AmqpFrames() if self.amqp else None
        if frames is not None:
            self.streams[up_w] = frames
        try:
            await asyncio.gather(self._pipe(client_r, up_w, frames), self._pipe(up_r, client_w))
        finally:
            self.streams.pop(up_w, None)
            self.pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, frames: AmqpFrames | None = None
    ) -> None:
        try:
            while data := await src.read(65536):
                while self._partitioned():
                    await asyncio.sleep(0.05)
                if time.monotonic() < self.latency_until:
                    await asyncio.sleep(self.latency_s)
                if frames is not None:
                    frames.feed(data)  # no await between this and the write
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()

    # -- faults, callable from any thread --------------------------------
    def partition(self, seconds: float) -> None:
        self.partitioned_until = time.monotonic() + seconds

    def latency(self, ms: float, seconds: float) -> None:
        self.latency_s = ms / 1000
        self.latency_until = time.monotonic() + seconds

    def keepalive(self, seconds: float) -> None:
        assert self.amqp, "heartbeats on behalf of clients need an AMQP proxy"
        self.keepalive_until = time.monotonic() + seconds

    def reset(self) -> int:
        async def reset_all() -> int:
            pairs = list(self.pairs)
            for pair in pairs:
                for w in pair:
                    _rst(w)
            return len(pairs)

        return int(self.faults.call(reset_all()))

    def heal(self) -> None:
        self.partitioned_until = 0.0
        self.latency_until = 0.0
        self.keepalive_until = 0.0

    def close(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
            if self.amqp:
                self.keepalive_task.cancel()
            for pair in list(self.pairs):
                for w in pair:
                    w.transport.abort()

        self.faults.call(close())
