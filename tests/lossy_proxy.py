"""A bad network link of our own, on 127.0.0.1 only (a test instrument): a TCP proxy that delays every chunk it
forwards, refuses some new connections outright and cuts established ones after a random lifetime.

TLS passes through untouched (the proxy sees only ciphertext), so a SuperNode pointed at the proxy still verifies
the SuperLink's certificate for 127.0.0.1. Everything is drawn from a seeded generator; `stop()` closes it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from dataclasses import dataclass, field


@dataclass
class LossyProxy:
    target_port: int
    drop_rate: float = 0.2  # share of new connections closed at once
    delay: tuple[float, float] = (0.02, 0.15)  # seconds added before each forwarded chunk
    lifetime: tuple[float, float] = (3.0, 12.0)  # seconds an accepted connection lives before it is cut
    seed: int = 0
    port: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "refused": 0, "cut": 0})
    counts_before_degrading: dict[str, int] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> LossyProxy:
        rng = random.Random(self.seed)
        ready = threading.Event()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while chunk := await reader.read(65536):
                    await asyncio.sleep(rng.uniform(*self.delay))
                    writer.write(chunk)
                    await writer.drain()
            writer.close()

        async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            if rng.random() < self.drop_rate:
                self.counts["refused"] += 1
                client_writer.close()
                return
            self.counts["accepted"] += 1
            try:
                server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_writer.close()
                return
            both = asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
            try:
                await asyncio.wait_for(both, timeout=rng.uniform(*self.lifetime))
            except TimeoutError:
                self.counts["cut"] += 1
            finally:
                client_writer.close()
                server_writer.close()

        async def serve() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        self._loop = asyncio.new_event_loop()

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                self._loop.run_until_complete(serve())

        self._thread = threading.Thread(target=run, daemon=True, name="lossy-proxy")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the lossy proxy did not start")
        return self

    def degrade(self, drop_rate: float, lifetime: tuple[float, float]) -> None:
        """From now on also refuse and cut connections (a link that worsens while it is in use)."""
        self.counts_before_degrading = dict(self.counts)
        self.drop_rate, self.lifetime = drop_rate, lifetime

    def counts_since_degrading(self) -> dict[str, int]:
        return {k: v - self.counts_before_degrading.get(k, 0) for k, v in self.counts.items()}

    def stop(self) -> None:
        if self._loop is not None:
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(10)
