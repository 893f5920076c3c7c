"""A loopback TCP proxy that cuts a connection at a chosen byte offset, in either direction.

`FaultProxy` forwards to a real server and counts the bytes of each connection both
ways. Once the watched direction ("down": server -> client, as in FETCH or RETR;
"up": client -> server, as in APPEND or SMTP DATA) has carried `cut_at` bytes, it
forwards exactly up to that offset and closes both sides: a dropped line at a
chosen point. Only the first `connections_to_cut` connections are cut, so a retry
or a rerun through the same proxy gets a clean line.

With `lag` (seconds), what the client sends on a connection that will be cut reaches
the server that much later, as over a slow path: the client sees the line drop at the
cut at once, while the server still receives and runs the commands sent just before
it, after the client may have reconnected. Leaving the `with` block waits until those late
bytes are in and the server's side is closed, so a test then sees all the server got.

`CutProxy(port, cut_after=N)` is the original server -> client form.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass

DIRECTIONS = ("down", "up")


@dataclass
class Traffic:
    """Bytes one connection carried: down (server -> client) and up (client -> server)."""

    down: int = 0
    up: int = 0


class FaultProxy:
    def __init__(
        self, target_port: int, cut_at: int | None = None, direction: str = "down", connections_to_cut: int = 1,
        lag: float = 0.0,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        self.target_port = target_port
        self.cut_at = cut_at
        self.direction = direction
        self.connections_to_cut = connections_to_cut
        self.lag = lag
        self.cuts = 0
        self.connections: list[Traffic] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._late: list[threading.Thread] = []  # lagged deliveries to the server, still running

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        for sender in self._late:
            sender.join(timeout=2 * self.lag + 10)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            limit = self.cut_for(len(self.connections))
            traffic = Traffic()
            self.connections.append(traffic)
            down = limit if self.direction == "down" else None
            up = limit if self.direction == "up" else None
            if self.lag and limit is not None and self.direction == "up":
                threading.Thread(target=self._lagged_up, args=(client, server, limit, traffic), daemon=True).start()
                threading.Thread(target=self._lagged_down, args=(server, client, traffic), daemon=True).start()
                continue
            threading.Thread(target=self._pipe, args=(client, server, up, traffic, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, down, traffic, "down"), daemon=True).start()

    def cut_for(self, number: int) -> int | None:
        """Where connection `number` (0, 1, ...) is cut in the watched direction; None: never."""
        return self.cut_at if number < self.connections_to_cut else None

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None, traffic: Traffic, way: str) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    sink.sendall(data[: limit - sent])
                    setattr(traffic, way, sent + limit - sent)
                    self.cuts += 1
                    break
                sink.sendall(data)
                sent += len(data)
                setattr(traffic, way, sent)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


    def _lagged_up(self, client: socket.socket, server: socket.socket, limit: int, traffic: Traffic) -> None:
        """Client -> server, each chunk delivered `lag` seconds after it came; the client is cut at once."""
        chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

        def deliver() -> None:
            try:
                while (item := chunks.get()) is not None:
                    due, data = item
                    time.sleep(max(0.0, due - time.monotonic()))
                    server.sendall(data)
            except OSError:
                pass
            finally:
                time.sleep(self.lag)  # the server runs what it got before it sees the end
                _close(server)

        sender = threading.Thread(target=deliver, daemon=True)
        self._late.append(sender)
        sender.start()
        sent = 0
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if sent + len(data) >= limit:
                    chunks.put((time.monotonic() + self.lag, data[: limit - sent]))
                    traffic.up = limit
                    self.cuts += 1
                    break
                chunks.put((time.monotonic() + self.lag, data))
                sent += len(data)
                traffic.up = sent
        except OSError:
            pass
        finally:
            _close(client)
            chunks.put(None)


    def _lagged_down(self, server: socket.socket, client: socket.socket, traffic: Traffic) -> None:
        """Server -> client for a lagged connection: once the client is gone, the server's answers are
        dropped, but its side stays open until the late bytes are in (_lagged_up closes it)."""
        try:
            while data := server.recv(65536):
                try:
                    client.sendall(data)
                    traffic.down += len(data)
                except OSError:
                    pass  # the client was cut: what the server says now reaches no one
        except OSError:
            pass
        finally:
            _close(client)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class CutProxy(FaultProxy):
    """Cut the server -> client stream after `cut_after` bytes (first connection only)."""

    def __init__(self, target_port: int, cut_after: int | None = None, connections_to_cut: int = 1) -> None:
        super().__init__(target_port, cut_after, "down", connections_to_cut)

    @property
    def cut_after(self) -> int | None:
        return self.cut_at
