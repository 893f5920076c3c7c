"""The web viewer: look into an archive in a browser, read-only, on loopback, behind a random token.

Needs the `web` extra (Starlette, uvicorn, Jinja2, nh3).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
from collections.abc import Callable

from .. import keys
from ..errors import UsageError, setting


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port); port 0 picks a free one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{setting('web')} wants HOST:PORT, e.g. 127.0.0.1:8025, not {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that is not localhost may resolve anywhere


class WebServer:
    """The viewer bound to host:port over an archive opened read-only; serve() blocks, start() runs it in a thread."""

    def __init__(self, archive: str, address: str, *, allow_remote: bool = False, token: str | None = None,
                 key_ring: keys.KeyRing | None = None) -> None:
        try:
            import uvicorn

            from .app import LOOPBACK_HOSTS, create_app
            from .viewer import Archive
        except ImportError as exc:
            raise UsageError(f"the web viewer needs the web extra: pip install 'mailbackup[web]' ({exc})") from exc
        host, port = parse_address(address)
        self.remote = not is_loopback(host)
        if self.remote and not allow_remote:
            raise UsageError(
                f"refusing to serve the viewer on {host}: it is not a loopback address and the viewer has no TLS; "
                f"add {setting('web_allow_remote')} if you mean it"
            )
        self.archive = Archive(archive, key_ring)  # unlocked (any prompt) before anything listens
        try:
            self.token = token or secrets.token_urlsafe(32)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.socket = socket.socket(family, socket.SOCK_STREAM)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.socket.bind((host, port))
            except OSError as exc:
                self.socket.close()
                raise UsageError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
            self.port = self.socket.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{self.port}/?token={self.token}"
            allowed = None if self.remote or ":" in host else LOOPBACK_HOSTS
            app = create_app(self.archive, self.token, allowed_hosts=allowed)
            config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, server_header=False)
            self.server = uvicorn.Server(config)
        except BaseException:
            self.archive.close()
            raise
        self.thread: threading.Thread | None = None

    def serve(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()
            self.archive.close()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.serve, name="mailbackup-web", daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            self.thread.join(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)


def serve_web(archive: str, address: str, *, allow_remote: bool = False, announce: Callable[[str], None] = print,
              warn: Callable[[str], None] = print, key_ring: keys.KeyRing | None = None) -> None:
    """Serve the viewer until interrupted; announce() gets the URL with the access token."""
    server = WebServer(archive, address, allow_remote=allow_remote, key_ring=key_ring)
    if server.remote:
        warn(f"warning: the viewer listens on {address}, beyond this machine, without TLS; anyone with the URL can read the archive")
    announce(server.url)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass  # uvicorn shuts down cleanly, then re-raises the signal; Ctrl-C is how a viewer ends
