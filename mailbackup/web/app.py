"""The viewer's routes (Starlette): pages, the sandboxed HTML frame, downloads, and the token gate."""

from __future__ import annotations

import hashlib
import itertools
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import keys
from ..errors import ArchiveCorrupt, MailbackupError, UsageError
from ..search import Filters, search, unindexed
from .chart import months_svg
from .render import frame_policy, sanitise
from .viewer import Archive

HERE = Path(__file__).parent
PER_PAGE = 50
# Every page: nothing from anywhere but here, no script at all, never inside another site's frame.
PAGE_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'self'; frame-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
DOWNLOAD_POLICY = "default-src 'none'; sandbox"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]
MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["size"] = lambda n: f"{n} B" if n < 1000 else (f"{n / 1000:.1f} kB" if n < 1_000_000 else f"{n / 1_000_000:.1f} MB")


def cookie_name(token: str) -> str:
    """One cookie per viewer: cookies ignore ports, so two viewers on one host must not share a name."""
    return "mailbackup_" + hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenGate:
    """Every route needs the token: once in the URL (exchanged for an HttpOnly, SameSite=Strict
    cookie and a redirect that drops it from the address bar), then from the cookie."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_name(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
            rest = request.url.remove_query_params("token")
            path = "/" + rest.path.lstrip("/")  # never '//host': that would send the browser elsewhere
            response: Response = RedirectResponse(path + (f"?{rest.query}" if rest.query else ""), status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        elif secrets.compare_digest(request.cookies.get(self.cookie, "").encode(), self.token.encode()):
            await self.app(scope, receive, self._secure(send))
            return
        else:
            response = PlainTextResponse("Open the viewer with the URL it printed at start (it carries the access token).\n", 401)
        await response(scope, receive, self._secure(send))

    @staticmethod
    def _secure(send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name, value in (
                    (b"content-security-policy", PAGE_POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                ):
                    if name not in names:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        return sending


def _int(value: str | None, default: int = 0) -> int:
    try:
        return max(0, int(value)) if value is not None else default
    except ValueError:
        return default


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise UsageError(f"not a date (YYYY-MM-DD): {value}") from None


def _attachment_disposition(filename: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in filename) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def create_app(archive: Archive, token: str, *, allowed_hosts: list[str] | None = LOOPBACK_HOSTS) -> Starlette:
    """The viewer over an archive already opened read-only; allowed_hosts None accepts any Host header."""

    def page(request: Request, name: str, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, {"accounts": archive.tree(), "several": len(archive.stores) > 1, **context})

    async def home(request: Request) -> Response:
        return await run_in_threadpool(page, request, "home.html")

    def _folder(request: Request) -> Response:
        account, folder_id = request.path_params["account"], request.path_params["folder"]
        sort = request.query_params.get("sort", "date")
        sort = sort if sort in archive.sorts(account) else "date"
        descending = request.query_params.get("order", "desc") != "asc"
        number = _int(request.query_params.get("page"))
        rows, total = archive.page(account, folder_id, sort=sort, descending=descending, page=number, per_page=PER_PAGE)
        return page(
            request, "folder.html", account=account, folder_id=folder_id, folder=archive.folder_name(account, folder_id),
            rows=rows, total=total, sort=sort, sorts=archive.sorts(account), descending=descending, page=number,
            pages=max(1, -(-total // PER_PAGE)),
        )

    async def folder(request: Request) -> Response:
        return await run_in_threadpool(_folder, request)

    def _search(request: Request) -> Response:
        q = request.query_params
        account = _int(q.get("account"))
        archive.store(account)
        number = _int(q.get("page"))
        fields = {key: q.get(key, "") for key in ("q", "from", "to", "subject", "since", "before", "folder")}
        hits = []
        more = False
        error = None
        missing = 0
        if any(fields.values()):
            try:
                filters = Filters(
                    fields["q"], fields["from"] or None, fields["to"] or None, fields["subject"] or None,
                    _date(fields["since"]), _date(fields["before"]), fields["folder"] or None,
                )
                # search() opens the archive itself, here in a worker thread: with the viewer's keys.
                with keys.using(archive.key_ring):
                    found = search(archive.url, filters, mailbox=archive.mailbox(account))
                    try:
                        hits = list(itertools.islice(found, number * PER_PAGE, (number + 1) * PER_PAGE + 1))
                    finally:
                        getattr(found, "close", lambda: None)()  # the generator's store closes now, not at GC
                    missing = unindexed(archive.url, mailbox=archive.mailbox(account))  # said, not hidden
                more = len(hits) > PER_PAGE
                hits = hits[:PER_PAGE]
            except UsageError as exc:
                error = str(exc)
        return page(request, "search.html", fields=fields, account=account, hits=hits, more=more, page=number, error=error,
                    missing=missing, query=str(request.url.remove_query_params("page").query))

    async def search_page(request: Request) -> Response:
        return await run_in_threadpool(_search, request)

    def _message(request: Request) -> Response:
        account, entry_id = request.path_params["account"], request.path_params["id"]
        remote = request.query_params.get("remote") == "1"
        view = archive.message(account, entry_id)
        blocked = sanitise(view.html, remote=False, images=view.inline_images).blocked if view.html else 0
        return page(request, "message.html", account=account, view=view, remote=remote, blocked=blocked)

    async def message(request: Request) -> Response:
        return await run_in_threadpool(_message, request)

    def _frame(request: Request) -> Response:
        account, entry_id = request.path_params["account"], request.path_params["id"]
        remote = request.query_params.get("remote") == "1"
        view = archive.message(account, entry_id)
        safe = sanitise(view.html or "", remote=remote, images=view.inline_images)
        body = f'<!DOCTYPE html><html><head><meta charset="utf-8"><base target="_blank"></head><body>{safe.html}</body></html>'
        return Response(body, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": frame_policy(remote)})

    async def frame(request: Request) -> Response:
        return await run_in_threadpool(_frame, request)

    def _eml(request: Request) -> Response:
        account, entry_id = request.path_params["account"], request.path_params["id"]
        entry, chunks = archive.chunks(account, entry_id)
        return StreamingResponse(
            chunks, media_type="message/rfc822",
            headers={"Content-Disposition": _attachment_disposition(f"{entry.id}-{entry.sha256[:12]}.eml"),
                     "Content-Length": str(entry.size), "Content-Security-Policy": DOWNLOAD_POLICY},
        )

    async def eml(request: Request) -> Response:
        return await run_in_threadpool(_eml, request)

    def _part(request: Request) -> Response:
        account, entry_id, index = request.path_params["account"], request.path_params["id"], request.path_params["index"]
        attachment, pieces = archive.attachment(account, entry_id, index)  # decoded as it is sent
        kind = attachment.content_type if MEDIA_TYPE.fullmatch(attachment.content_type) else "application/octet-stream"
        return StreamingResponse(pieces, media_type=kind, headers={
            "Content-Disposition": _attachment_disposition(attachment.filename), "Content-Security-Policy": DOWNLOAD_POLICY})

    async def part(request: Request) -> Response:
        return await run_in_threadpool(_part, request)

    def _chart(request: Request) -> Response:
        return page(request, "chart.html", svg=months_svg(archive.months()))

    async def chart(request: Request) -> Response:
        return await run_in_threadpool(_chart, request)

    async def style(request: Request) -> Response:
        return Response((HERE / "style.css").read_bytes(), media_type="text/css")

    async def known_error(request: Request, exc: Exception) -> Response:
        status = 500 if isinstance(exc, ArchiveCorrupt) else 404
        return PlainTextResponse(f"{exc}\n", status)

    middleware = [Middleware(TokenGate, token=token)]
    if allowed_hosts is not None:
        # A page on another site that resolves its own name to 127.0.0.1 (DNS rebinding) gets nowhere.
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    return Starlette(
        routes=[
            Route("/", home),
            Route("/f/{account:int}/{folder:int}", folder),
            Route("/search", search_page),
            Route("/chart", chart),
            Route("/m/{account:int}/{id:int}", message),
            Route("/m/{account:int}/{id:int}/body", frame),
            Route("/m/{account:int}/{id:int}/eml", eml),
            Route("/m/{account:int}/{id:int}/part/{index:int}", part),
            Route("/style.css", style),
        ],
        middleware=middleware,
        exception_handlers={MailbackupError: known_error},
    )
