"""The web viewer: token gate, CSP, sanitised HTML mail, downloads byte-identical to the archive,
search as `mailbackup search` finds, paging; and a real headless Chromium that opens it."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("starlette")
from starlette.testclient import TestClient

from mailbackup import BackupOptions, backup
from mailbackup.cli import main
from mailbackup.errors import UsageError
from mailbackup.stores import open_store
from mailbackup.web import WebServer, is_loopback, parse_address
from mailbackup.web.app import PER_PAGE, cookie_name, create_app
from mailbackup.web.render import sanitise
from mailbackup.web.viewer import Archive

CORPUS = Path(__file__).resolve().parent / "corpus"
TOKEN = "t0ken-for-tests"
BULK = 130  # more than two pages of the list


class Recorder:
    """A local HTTP server standing in for the internet: it records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.requests.append(self.path)
                body = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x01D\x00;"
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def bulk_message(n: int) -> bytes:
    when = datetime(2022, 1, 1, tzinfo=UTC) + timedelta(days=7 * n)
    return (
        f"From: Sender {n:03d} <s{n:03d}@example.net>\r\nTo: me@example.org\r\nSubject: report number {n:03d}\r\n"
        f"Date: {when.strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\nMessage-ID: <bulk{n}@example.net>\r\n\r\n"
        f"Weekly report {n}. {'filler ' * (n % 17)}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


@pytest.fixture(scope="module")
def html_mail(recorder: Recorder) -> bytes:
    return (CORPUS / "web" / "html_remote_image_and_script.eml").read_bytes().replace(b"REMOTE", recorder.address.encode())


@pytest.fixture(scope="module")
def archive(dovecot, recorder: Recorder, html_mail: bytes, tmp_path_factory: pytest.TempPathFactory) -> str:  # type: ignore[no-untyped-def]
    """A Maildir archive backed up from the suite's Dovecot: corpus mail, the HTML mail, and a long folder."""
    account = dovecot.add_user()
    with dovecot.client(account) as imap:
        for folder in ("Archive/2022", "Newsletters"):
            imap.create_folder(folder)
        for path in sorted((CORPUS / "mikel-mail" / "plain_emails").glob("*.eml"))[:6]:
            imap.append("INBOX", path.read_bytes(), (), datetime(2021, 5, 1, tzinfo=UTC))
        for path in ("attachment_emails/attachment_pdf.eml", "attachment_emails/attachment_nonascii_filename.eml"):
            imap.append("INBOX", (CORPUS / "mikel-mail" / path).read_bytes(), (b"\\Seen",), datetime(2023, 2, 1, tzinfo=UTC))
        imap.append("Newsletters", html_mail, (), datetime(2024, 6, 14, tzinfo=UTC))
        for n in range(BULK):
            imap.append("Archive/2022", bulk_message(n), (b"\\Seen",) if n % 3 else (),
                        datetime(2022, 1, 1, tzinfo=UTC) + timedelta(days=7 * n))
    url = f"maildir:{tmp_path_factory.mktemp('web') / 'md'}"
    summary = backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    assert summary.ok and summary.new == 6 + 2 + 1 + BULK
    return url


@pytest.fixture(scope="module")
def viewer(archive: str) -> Iterator[Archive]:
    opened = Archive(archive)
    yield opened
    opened.close()


@pytest.fixture
def client(viewer: Archive) -> TestClient:
    client = TestClient(create_app(viewer, TOKEN, allowed_hosts=None), follow_redirects=False)
    client.cookies.set(cookie_name(TOKEN), TOKEN)
    return client


def entry_of(archive: str, folder: str) -> tuple[int, str]:
    store = open_store(archive, mode="read")
    try:
        found = store.catalog.folder(folder)
        assert found is not None
        entry = next(store.catalog.entries(found.id))
        return entry.id, store.get(entry.location).hex()
    finally:
        store.close()


def folder_id(archive: str, name: str) -> int:
    store = open_store(archive, mode="read")
    try:
        found = store.catalog.folder(name)
        assert found is not None
        return found.id
    finally:
        store.close()


def tree_hash(archive: str) -> str:
    """A hash over every file of the archive, names, sizes, times and bytes."""
    root = Path(archive.split(":", 1)[1])
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)} {stat.st_size} {stat.st_mtime_ns}".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# the gate


def test_every_route_needs_the_token(viewer: Archive, archive: str) -> None:
    bare = TestClient(create_app(viewer, TOKEN, allowed_hosts=None), follow_redirects=False)
    html_id, _ = entry_of(archive, "Newsletters")
    for path in ("/", "/search?q=report", "/chart", f"/m/0/{html_id}", f"/m/0/{html_id}/body", f"/m/0/{html_id}/eml",
                 "/style.css", f"/f/0/{folder_id(archive, 'INBOX')}"):
        response = bare.get(path)
        assert response.status_code == 401, path
        assert "token" in response.text
    bare.cookies.set(cookie_name(TOKEN), "wrong")
    assert bare.get("/").status_code == 401
    assert bare.get("/?token=wrong").status_code == 401


def test_token_in_the_url_becomes_a_strict_httponly_cookie(viewer: Archive) -> None:
    fresh = TestClient(create_app(viewer, TOKEN, allowed_hosts=None), follow_redirects=False)
    response = fresh.get(f"/search?q=report&token={TOKEN}")
    assert response.status_code == 303
    assert response.headers["location"] == "/search?q=report"  # the token leaves the address bar
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(TOKEN)}={TOKEN}")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("SameSite=Strict", "SameSite=strict")
    assert fresh.get("/search?q=report").status_code == 200  # the client kept the cookie
    assert fresh.get(f"http://testserver//evil.example/x?token={TOKEN}").headers["location"] == "/evil.example/x"  # stays here


def test_a_foreign_host_header_is_refused(viewer: Archive) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 gets nothing, token or not."""
    guarded = TestClient(create_app(viewer, TOKEN), base_url="http://evil.example", follow_redirects=False)
    guarded.cookies.set(cookie_name(TOKEN), TOKEN)
    assert guarded.get("/").status_code == 400
    local = TestClient(create_app(viewer, TOKEN), base_url="http://127.0.0.1:8025", follow_redirects=False)
    local.cookies.set(cookie_name(TOKEN), TOKEN)
    assert local.get("/").status_code == 200


def test_pages_carry_a_strict_content_security_policy(client: TestClient, archive: str) -> None:
    html_id, _ = entry_of(archive, "Newsletters")
    for path in ("/", f"/m/0/{html_id}", "/chart", "/search?q=x"):
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script-src" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "<script" not in response.text.lower()


# the folder tree, lists, paging, sorting


def test_home_shows_the_folder_tree_with_counts(client: TestClient) -> None:
    page = client.get("/").text
    assert re.search(r">Archive/2022</a></td>\s*<td class=\"num\">130<", page)
    assert re.search(r">INBOX</a></td>\s*<td class=\"num\">8<", page)
    assert re.search(r">Newsletters</a></td>\s*<td class=\"num\">1<", page)
    assert ">2022</a>" in page  # the sidebar shows the leaf under its parent


def subjects(page: str) -> list[str]:
    return re.findall(r">(report number \d+)</a>", page)


def test_a_folder_pages_through_the_catalog(client: TestClient, archive: str) -> None:
    fid = folder_id(archive, "Archive/2022")
    first = client.get(f"/f/0/{fid}").text
    assert "130 messages" in first and "page 1 of 3" in first
    assert subjects(first)[:2] == ["report number 129", "report number 128"]  # newest first
    assert len(subjects(first)) == PER_PAGE
    last = client.get(f"/f/0/{fid}?page=2").text
    assert subjects(last) == [f"report number {n:03d}" for n in range(BULK - 2 * PER_PAGE - 1, -1, -1)]
    every = [s for page in range(3) for s in subjects(client.get(f"/f/0/{fid}?page={page}").text)]
    assert sorted(every) == sorted(f"report number {n:03d}" for n in range(BULK))  # each once, none lost


def test_a_folder_sorts_by_date_from_subject_and_size(client: TestClient, archive: str) -> None:
    fid = folder_id(archive, "Archive/2022")
    assert subjects(client.get(f"/f/0/{fid}?sort=date&order=asc").text)[:2] == ["report number 000", "report number 001"]
    assert subjects(client.get(f"/f/0/{fid}?sort=subject&order=asc").text)[:1] == ["report number 000"]
    assert subjects(client.get(f"/f/0/{fid}?sort=subject&order=desc").text)[:1] == ["report number 129"]
    senders = re.findall(r"<td>(Sender \d+)", client.get(f"/f/0/{fid}?sort=from&order=desc").text)
    assert senders[:2] == ["Sender 129", "Sender 128"]
    sizes = client.get(f"/f/0/{fid}?sort=size&order=desc").text
    # filler length repeats every 17 messages: the biggest have n % 17 == 16 and three-digit n
    assert subjects(sizes)[0] in {f"report number {n:03d}" for n in range(BULK) if n % 17 == 16}


# search


def test_search_finds_what_mailbackup_search_finds(client: TestClient, archive: str) -> None:
    cases = [
        ({"q": "report"}, ["report"]),
        ({"q": "flamingo"}, ["flamingo"]),
        ({"from": "Sender 007"}, ["--from", "Sender 007"]),
        ({"subject": "offers"}, ["--subject", "offers"]),
        ({"q": "report", "since": "2023-06-01", "before": "2023-09-01"}, ["report", "--since", "2023-06-01", "--before", "2023-09-01"]),
        ({"q": "report", "folder": "Archive/2022"}, ["report", "--folder", "Archive/2022"]),
        ({"to": "me@example.org", "folder": "Newsletters"}, ["--to", "me@example.org", "--folder", "Newsletters"]),
    ]
    for params, argv in cases:
        result = CliRunner().invoke(main, ["search", archive, *argv, "--json"])
        assert result.exit_code == 0, result.output
        expected = [json.loads(line)["id"] for line in result.output.splitlines()]
        assert expected, params
        shown: list[int] = []
        for page in range(10):
            text = client.get("/search", params={**params, "page": str(page)}).text
            shown += [int(i) for i in re.findall(r'<a href="/m/0/(\d+)">', text)]
            if 'rel="next"' not in text:
                break
        assert shown == expected, params


def test_search_says_when_the_index_lacks_messages(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    account = dovecot.add_user()
    dovecot.append(account, "INBOX", bulk_message(1))
    url = f"maildir:{tmp_path / 'md'}"
    assert backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True, index=False)).new == 1
    opened = Archive(url)
    try:
        client = TestClient(create_app(opened, TOKEN, allowed_hosts=None), follow_redirects=False)
        client.cookies.set(cookie_name(TOKEN), TOKEN)
        text = client.get("/search", params={"q": "anything"}).text
        assert '<p class="error" id="unindexed">1 message is not in the search index yet' in text
    finally:
        opened.close()


def test_search_with_a_bad_date_says_so(client: TestClient) -> None:
    response = client.get("/search", params={"q": "x", "since": "yesterday"})
    assert response.status_code == 200 and "not a date" in response.text


# one message, HTML made safe


def test_html_mail_is_sanitised_and_remote_images_wait_for_the_click(client: TestClient, archive: str, recorder: Recorder) -> None:
    html_id, _ = entry_of(archive, "Newsletters")
    page = client.get(f"/m/0/{html_id}").text
    assert "Weekly offers with a tracking pixel" in page and "1 remote image blocked" in page
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in page and "allow-scripts" not in page
    assert f'src="/m/0/{html_id}/body"' in page and 'id="load-remote"' in page
    assert "price list.pdf" in page  # the attachment is listed
    frame = client.get(f"/m/0/{html_id}/body")
    body = frame.text.lower()
    assert "flamingo umbrellas" in body
    for bad in ("<script", "onerror", "onclick", "javascript:", "<iframe", "<object", "script ran", recorder.address):
        assert bad not in body, bad
    assert "data:image/gif;base64," in body  # the cid: logo comes inline, from the message itself
    policy = frame.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "img-src data:;" in policy and "sandbox" in policy and "http:" not in policy
    assert "font-src" not in policy and "connect-src" not in policy  # default-src 'none' covers them
    assert "script-src" not in policy
    # The click: this view only, remote images allowed by the frame's policy and kept in its HTML.
    loaded = client.get(f"/m/0/{html_id}?remote=1").text
    assert f'src="/m/0/{html_id}/body?remote=1"' in loaded
    remote = client.get(f"/m/0/{html_id}/body?remote=1")
    assert f'src="http://{recorder.address}/pixel.png"' in remote.text
    assert "img-src data: http: https:" in remote.headers["content-security-policy"]
    assert "<script" not in remote.text.lower() and "onerror" not in remote.text.lower()
    assert "id=\"load-remote\"" in client.get(f"/m/0/{html_id}").text  # the next view blocks them again
    assert recorder.requests == []  # the server itself never fetches anything


def test_sanitise_keeps_text_and_drops_every_active_thing() -> None:
    safe = sanitise(
        '<p style="background:url(http://x/a)">hi<script>alert(1)</script><img src="http://x/p.png" onerror="alert(1)">'
        '<img src="//x/q.png"><a href="data:text/html,<script>alert(1)</script>">x</a><svg onload="alert(1)"></svg></p>',
        remote=False, images={},
    )
    assert safe.blocked == 2
    assert "alert" not in safe.html and "http://x" not in safe.html and "data:" not in safe.html and "url(" not in safe.html
    assert "hi" in safe.html
    styled = sanitise(
        '<style>p{background:url(http://x/s)}</style><table bgcolor="#eee" width="600"><tr><td style="color: red; '
        'background-image: url(http://x/b); position: fixed; font-size: 14px">cell</td></tr></table>',
        remote=True, images={},
    )
    assert 'style="color:red;font-size:14px"' in styled.html and 'bgcolor="#eee"' in styled.html
    assert "http://x" not in styled.html and "<style" not in styled.html and "position" not in styled.html


def test_text_mail_shows_its_text_part(client: TestClient, archive: str) -> None:
    fid = folder_id(archive, "Archive/2022")
    message_id = re.findall(r'<a href="/m/0/(\d+)">report number 005<', client.get(f"/f/0/{fid}?sort=date&order=asc").text)[0]
    page = client.get(f"/m/0/{message_id}").text
    assert "Weekly report 5." in page and "<iframe" not in page
    assert "Sender 005 &lt;s005@example.net&gt;" in page  # headers escaped, never markup


# downloads


def test_eml_download_is_byte_identical_to_the_archive(client: TestClient, archive: str) -> None:
    before = tree_hash(archive)
    for folder in ("Newsletters", "INBOX", "Archive/2022"):
        entry_id, raw_hex = entry_of(archive, folder)
        response = client.get(f"/m/0/{entry_id}/eml")
        assert response.status_code == 200
        assert response.content == bytes.fromhex(raw_hex)
        assert response.headers["content-type"] == "message/rfc822"
        assert response.headers["content-disposition"].startswith("attachment;")
        assert response.headers["x-content-type-options"] == "nosniff"
    assert tree_hash(archive) == before  # viewing changes no byte, name or time in the archive


@pytest.mark.parametrize("kind", ["maildir", "mbox", "sqlite"])
def test_every_store_streams_exactly_the_bytes_get_returns(dovecot, tricky_messages, kind: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Cut in 7-byte pieces, so every line end, CRLF pair and >From quote falls across a cut somewhere."""
    from mailbackup import stores

    account = dovecot.add_user()
    with dovecot.client(account) as imap:
        for raw in tricky_messages.values():
            imap.append("INBOX", raw)
        imap.append("INBOX", b"Subject: lf\n\nFrom here\n>From there\n>>From everywhere\n")
    url = {"maildir": f"maildir:{tmp_path / 'md'}", "mbox": f"mbox:{tmp_path / 'mb'}", "sqlite": str(tmp_path / "a.sqlite")}[kind]
    assert backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True)).ok
    monkeypatch.setattr(stores, "STREAM_CHUNK", 7)
    store = open_store(url, mode="read")
    try:
        assert hasattr(store, "stream")
        entries = list(store.catalog.entries())
        assert len(entries) == len(tricky_messages) + 1
        for entry in entries:
            pieces = list(stores.read_chunks(store, entry.location))
            assert b"".join(pieces) == store.get(entry.location)
            assert entry.size < 8 or len(pieces) > 1  # really in pieces
    finally:
        store.close()


def test_a_damaged_message_never_downloads_whole(client: TestClient, archive: str, tmp_path: Path) -> None:
    """The bytes on disk no longer match the catalog: the download stops short of its Content-Length."""
    copy = tmp_path / "copy"
    shutil.copytree(archive.split(":", 1)[1], copy)
    damaged = Archive(f"maildir:{copy}")
    try:
        entry_id, _ = entry_of(f"maildir:{copy}", "Newsletters")
        entry = damaged.entry(0, entry_id)
        path = next((copy).rglob(entry.location.rsplit("/", 1)[1].split(":")[0] + "*"))
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x20
        path.write_bytes(bytes(data))
        viewer = TestClient(create_app(damaged, TOKEN, allowed_hosts=None))
        viewer.cookies.set(cookie_name(TOKEN), TOKEN)
        page = viewer.get(f"/m/0/{entry_id}")
        assert page.status_code == 500 and "does not match its SHA-256" in page.text  # the page says so
    finally:
        damaged.close()
    # Over real HTTP: the body ends short of its Content-Length, which every client takes as a failed download.
    server = WebServer(f"maildir:{copy}", "127.0.0.1:0")
    server.start()
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        opener.open(server.url).read()
        with opener.open(f"http://127.0.0.1:{server.port}/m/0/{entry_id}/eml") as response, pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        server.stop()


def test_attachment_downloads_with_its_type_as_an_attachment(client: TestClient, archive: str, html_mail: bytes) -> None:
    html_id, _ = entry_of(archive, "Newsletters")
    index = re.findall(rf'href="/m/0/{html_id}/part/(\d+)" download>price list.pdf<', client.get(f"/m/0/{html_id}").text)[0]
    response = client.get(f"/m/0/{html_id}/part/{index}")
    assert response.content.startswith(b"%PDF-1.4") and response.content.rstrip().endswith(b"%%EOF")
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["content-disposition"] == "attachment; filename=\"price list.pdf\"; filename*=UTF-8''price%20list.pdf"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in response.headers["content-security-policy"]
    assert client.get(f"/m/0/{html_id}/part/999").status_code == 404
    assert client.get("/m/0/999999").status_code == 404


def test_chart_draws_messages_per_month_and_folder(client: TestClient) -> None:
    page = client.get("/chart").text
    assert "<svg" in page and "Archive/2022 (130)" in page and "INBOX (8)" in page and "Newsletters (1)" in page
    assert "<title>2024-06 Newsletters: 1</title>" in page
    assert "<title>2022-01 Archive/2022: 5</title>" in page  # five Saturdays from 2022-01-01


# serving


def test_only_loopback_unless_allowed() -> None:
    assert parse_address("127.0.0.1:8025") == ("127.0.0.1", 8025)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    with pytest.raises(UsageError, match="HOST:PORT"):
        parse_address("8025")
    with pytest.raises(UsageError, match="web allow remote"):
        WebServer("maildir:/nonexistent", "0.0.0.0:0")


def test_cli_refuses_a_remote_bind_and_a_missing_archive(archive: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", archive, "--web", "0.0.0.0:0"])
    assert result.exit_code == 2 and "--web-allow-remote" in result.output
    result = CliRunner().invoke(main, ["serve", f"maildir:{tmp_path / 'none'}", "--web", "127.0.0.1:0"])
    assert result.exit_code == 2 and "error" in result.output
    assert not (tmp_path / "none").exists()  # read-only: nothing created
    result = CliRunner().invoke(main, ["serve", archive])
    assert result.exit_code == 2 and "--web HOST:PORT" in result.output


def test_server_prints_a_token_url_and_serves_over_http(archive: str) -> None:
    server = WebServer(archive, "127.0.0.1:0")
    server.start()
    try:
        assert re.fullmatch(rf"http://127\.0\.0\.1:{server.port}/\?token=[A-Za-z0-9_-]{{40,}}", server.url)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/")
        assert refused.value.code == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(server.url) as response:
            assert response.status == 200 and b"Archive/2022" in response.read()
    finally:
        server.stop()


# a real browser


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The README's pictures: MAILBACKUP_SCREENSHOTS=docs/screenshots refreshes them; otherwise they go to a temp dir.
SCREENSHOTS_ENV = "MAILBACKUP_SCREENSHOTS"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are missing: run bash tests/bootstrap.sh", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


def test_chromium_searches_opens_html_mail_without_remote_loads_and_downloads_the_eml(
    browser, archive: str, recorder: Recorder, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    screenshots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
    server = WebServer(archive, "127.0.0.1:0")
    server.start()
    recorder.requests.clear()
    try:
        driver.get(server.url)
        assert "token" not in driver.current_url  # swapped for the cookie
        assert driver.find_element(By.LINK_TEXT, "Archive/2022")
        screenshots.mkdir(parents=True, exist_ok=True)
        driver.get(f"http://127.0.0.1:{server.port}/f/0/{folder_id(archive, 'Archive/2022')}")
        driver.save_screenshot(str(screenshots / "folder.png"))

        box = driver.find_element(By.NAME, "q")
        box.send_keys("flamingo")
        box.submit()
        hit = driver.find_element(By.LINK_TEXT, "Weekly offers with a tracking pixel")
        hit.click()
        frame = driver.find_element(By.ID, "html-body")
        driver.switch_to.frame(frame)
        assert "Flamingo umbrellas" in driver.find_element(By.TAG_NAME, "body").text
        pixel = driver.find_element(By.CSS_SELECTOR, "img[alt='tracking pixel']")
        assert not pixel.get_attribute("src")  # held back
        driver.switch_to.default_content()
        time.sleep(1.0)  # time for anything that might still try to load
        assert recorder.requests == []  # no remote image, no script beacon, no onerror beacon
        assert driver.title.startswith("Weekly offers")  # no script changed it
        driver.save_screenshot(str(screenshots / "message.png"))

        # The click shows they would have loaded: the recorder is reachable from this page.
        driver.find_element(By.ID, "load-remote").click()
        deadline = time.monotonic() + 10
        while "/pixel.png" not in recorder.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        assert recorder.requests == ["/pixel.png"]  # the image only: script and onerror stay dead
        assert driver.title.startswith("Weekly offers")

        entry_id = int(driver.current_url.split("/m/0/")[1].split("?")[0])
        driver.find_element(By.ID, "download-eml").click()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            done = [p for p in driver.downloads.iterdir() if p.suffix == ".eml"]
            if done:
                break
            time.sleep(0.1)
        assert len(done) == 1
        store = open_store(archive, mode="read")
        try:
            entry = store.catalog.entry(entry_id)
            assert entry is not None
            assert done[0].read_bytes() == store.get(entry.location)
            assert hashlib.sha256(done[0].read_bytes()).hexdigest() == entry.sha256
        finally:
            store.close()

        driver.get(f"http://127.0.0.1:{server.port}/chart")
        assert driver.find_element(By.CSS_SELECTOR, "svg.chart")
        driver.save_screenshot(str(screenshots / "chart.png"))
    finally:
        server.stop()
    shutil.rmtree(driver.downloads, ignore_errors=True)


# other archives: several accounts in one database, and PostgreSQL without a search index


def test_an_archive_of_two_accounts_shows_each_with_its_own_folders(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "two.sqlite")
    names = []
    for n, folder in enumerate(("Work", "Family")):
        account = dovecot.add_user()
        dovecot.append(account, folder, bulk_message(n))
        assert backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True)).ok
        names.append(f"{account.user}@{account.host}")
    viewer = Archive(url)
    try:
        client = TestClient(create_app(viewer, TOKEN, allowed_hosts=None))
        client.cookies.set(cookie_name(TOKEN), TOKEN)
        home = client.get("/").text
        assert names[0] in home and names[1] in home
        trees = {tree.name: [f.name for f in tree.folders] for tree in viewer.tree()}
        assert trees[names[0]] == ["INBOX", "Work"] or trees[names[0]] == ["Work"]
        assert "Family" in trees[names[1]] and "Work" not in trees[names[1]]
        second = viewer.names.index(names[1])
        family = next(f.id for f in viewer.tree()[second].folders if f.name == "Family")
        assert "report number 001" in client.get(f"/f/{second}/{family}").text
        assert client.get(f"/f/{1 - second}/{family}").status_code == 404  # another account's folder
        hits = client.get("/search", params={"q": "report", "account": str(second)}).text
        assert "report number 001" in hits and "report number 000" not in hits
    finally:
        viewer.close()


def test_a_postgresql_archive_lists_from_the_messages_and_says_search_needs_sqlite(dovecot, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    account = dovecot.add_user()
    for n in range(3):
        dovecot.append(account, "INBOX", bulk_message(n))
    assert backup(account.url("imap"), pg_url, password=account.password, options=BackupOptions(no_tls=True)).ok
    viewer = Archive(pg_url)
    try:
        client = TestClient(create_app(viewer, TOKEN, allowed_hosts=None))
        client.cookies.set(cookie_name(TOKEN), TOKEN)
        inbox = viewer.tree()[0].folders[0].id
        page = client.get(f"/f/0/{inbox}?sort=subject&order=asc").text  # no index: sorted by date instead
        assert subjects(page) == ["report number 000", "report number 001", "report number 002"]
        assert "Sender 001 &lt;s001@example.net&gt;" in page
        assert "<th>Subject</th>" in page and "?sort=date" in page  # offered only where it works
        assert "needs a SQLite catalog" in client.get("/search", params={"q": "report"}).text
        entry_id = int(re.findall(r'<a href="/m/0/(\d+)">report number 002<', page)[0])
        assert client.get(f"/m/0/{entry_id}/eml").content == bulk_message(2)
    finally:
        viewer.close()


# attachments decoded as they are sent


def test_parts_walk_and_decode_as_the_email_package_does() -> None:
    import email
    import email.policy

    from mailbackup.web import parts
    from tests.corpus.tricky import tricky_messages

    messages = {str(p): p.read_bytes() for p in CORPUS.rglob("*.eml")} | tricky_messages()
    sure = 0
    for name, raw in messages.items():
        walked = list(email.message_from_bytes(raw, policy=email.policy.compat32).walk())
        try:
            spans = parts.walk(raw)
        except parts.Unsure:
            continue  # the viewer reads these with the email package
        sure += 1
        assert [(s.index, s.container, s.headers.get_content_type()) for s in spans] == [
            (i, p.is_multipart(), p.get_content_type()) for i, p in enumerate(walked)], name
        for span, part in zip(spans, walked):
            if not span.container and "uue" not in str(part.get("content-transfer-encoding", "")).lower():
                assert b"".join(parts.decoded(raw, span)) == part.get_payload(decode=True), (name, span.index)
    assert sure >= 0.8 * len(messages)


def test_a_big_attachment_downloads_with_memory_near_the_message_size(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import base64
    import tracemalloc

    attachment = os.urandom(12 << 20)
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    raw = (b"From: a@example.net\r\nTo: b@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="xx"\r\n\r\n--xx\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n'
           b'--xx\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="big.bin"\r\n'
           b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--xx--\r\n")
    account = dovecot.add_user()
    dovecot.append(account, "INBOX", raw, ())
    url = f"maildir:{tmp_path / 'md'}"
    assert backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True)).new == 1
    viewer = Archive(url)
    try:
        entry = next(viewer.store(0).catalog.entries())
        index = viewer.message(0, entry.id).attachments[0].index

        def peak(download) -> int:  # type: ignore[no-untyped-def]
            tracemalloc.start()
            try:
                found, pieces = download()
                digest = hashlib.sha256()
                for piece in pieces:
                    digest.update(piece)
                assert found.filename == "big.bin" and digest.digest() == hashlib.sha256(attachment).digest()
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        streamed = peak(lambda: viewer.attachment(0, entry.id, index))
        parsed = peak(lambda: viewer._attachment_parsed(0, entry.id, index, viewer.raw(0, entry.id)[1]))
        print(f"peak memory for a {len(raw) >> 20} MiB message: streamed {streamed >> 20} MiB, parsed whole {parsed >> 20} MiB")
        assert streamed < 1.3 * len(raw)  # the message once, and a piece of it
        assert parsed > 2 * len(raw)  # what the email package's reading costs: the test can tell them apart
    finally:
        viewer.close()
