"""A small TCP fault proxy: what ``tc netem`` would do, in user space.

Each :class:`FaultProxy` listens on its own port and forwards to one target
port. Faults are switched on and off from any thread:

- ``partition(seconds)``: nothing is forwarded either way (bytes wait in the
  proxy like unacknowledged segments), new connections hang; heartbeats
  time out on the far side exactly as through a dead link;
- ``reset()``: every open connection is torn down with a TCP RST;
- ``latency(ms, seconds)``: each chunk is delayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from typing import Any


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
    def __init__(self, faults: FaultLoop, name: str, listen_port: int, target_port: int) -> None:
        self.faults = faults
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
        try:
            await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))
        finally:
            self.pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                while self._partitioned():
                    await asyncio.sleep(0.05)
                if time.monotonic() < self.latency_until:
                    await asyncio.sleep(self.latency_s)
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

    def close(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
            for pair in list(self.pairs):
                for w in pair:
                    w.transport.abort()

        self.faults.call(close())
