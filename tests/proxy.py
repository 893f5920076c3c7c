"""A loopback TCP proxy that cuts a connection after a chosen number of bytes.

It forwards to a real server, counts what the server sends back, and closes both
sides once that count passes `cut_after`: a dropped line at a chosen point.
"""

from __future__ import annotations

import socket
import threading


class CutProxy:
    def __init__(self, target_port: int, cut_after: int | None = None, connections_to_cut: int = 1) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.connections_to_cut = connections_to_cut
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()

    def __enter__(self) -> CutProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.cut_after if self.cuts < self.connections_to_cut else None
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, limit), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    sink.sendall(data[: limit - sent])
                    self.cuts += 1
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
