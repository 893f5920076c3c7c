"""Parsing and planning helpers, tested on bytes and lists without a server."""

from array import array

import pytest

from mailbackup.errors import ServerError, UsageError
from mailbackup.model import Folder
from mailbackup.net import parse_url
from mailbackup.pipeline import batches, diff_sorted, wanted
from mailbackup.sources.imap import decode_flags, parse_fetch, sequence_set


def test_sequence_set_compresses_runs() -> None:
    assert sequence_set([1, 2, 3, 5, 7, 8, 10]) == "1:3,5,7:8,10"
    assert sequence_set([42]) == "42"


def test_parse_fetch_keys_by_uid_and_drops_unsolicited() -> None:
    lines = [
        (b"1 (UID 10 RFC822.SIZE 5 FLAGS (\\Seen) BODY[] {5}", b"hello"),
        b")",
        b"2 (FLAGS (\\Deleted))",  # unsolicited, no UID: must not land on UID 2
        b"3 (UID 2 FLAGS ())",
    ]
    parsed = parse_fetch(lines)
    assert set(parsed) == {10, 2}
    assert parsed[10][b"BODY[]"] == b"hello"
    assert parsed[2][b"FLAGS"] == ()


def test_parse_fetch_rejects_malformed_replies() -> None:
    with pytest.raises(ServerError):
        parse_fetch([b"1 (UID 10 FLAGS)"])
    with pytest.raises(ServerError):
        parse_fetch([b"1 (UID abc FLAGS ())"])


def test_recent_flag_is_dropped() -> None:
    assert decode_flags([b"\\Recent", b"\\Seen", b"$Label1"]) == ("$Label1", "\\Seen")


def test_diff_sorted_finds_new_and_gone() -> None:
    new, gone = diff_sorted(array("q", [1, 2, 4, 6, 9]), array("q", [2, 3, 4, 5]))
    assert list(new) == [1, 6, 9]
    assert list(gone) == [3, 5]


def test_batches_bound_count_and_bytes() -> None:
    sizes = {1: 10, 2: 10, 3: 100, 4: 5, 5: 5}
    assert list(batches([1, 2, 3, 4, 5], sizes, max_messages=10, max_bytes=25)) == [[1, 2], [3], [4, 5]]
    assert list(batches([1, 2, 3, 4, 5], sizes, max_messages=2, max_bytes=1000)) == [[1, 2], [3, 4], [5]]


def test_folder_globs_match_either_delimiter() -> None:
    folder = Folder("INBOX.Archive.2024", ".")
    assert wanted(folder, ("INBOX/Archive/*",), ())
    assert wanted(folder, ("INBOX.Archive.*",), ())
    assert not wanted(folder, (), ("*/2024",))
    assert wanted(folder, (), ())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("imaps://alice@mail.example.org", ("alice", "mail.example.org", 993, "implicit")),
        ("imap://alice@example.org@mail.example.org:1143", ("alice@example.org", "mail.example.org", 1143, "starttls")),
        ("imap://a%40b@[::1]:10143", ("a@b", "::1", 10143, "starttls")),
    ],
)
def test_parse_url(url: str, expected: tuple[str, str, int, str]) -> None:
    endpoint = parse_url(url)
    assert (endpoint.user, endpoint.host, endpoint.port, endpoint.tls) == expected


@pytest.mark.parametrize(
    "url",
    ["alice@host", "http://alice@host", "imap://host", "imap://alice:secret@host", "imap://alice@host:99999", "imap://alice@host:x"],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(UsageError):
        parse_url(url)


def test_no_tls_contradicts_implicit_tls() -> None:
    with pytest.raises(UsageError):
        parse_url("imaps://alice@host", no_tls=True)
    assert parse_url("imap://alice@host", no_tls=True).tls == "none"


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mailbackup.sources.imap import parse_fetch_fast, parse_fetch_general  # noqa: E402

_flag = st.sampled_from([b"\\Seen", b"\\Answered", b"$Forwarded", b"Junk", b"\\Flagged", b"$Label_1"])
_item = st.one_of(
    st.integers(1, 2**32 - 1).map(lambda n: b"RFC822.SIZE %d" % n),
    st.lists(_flag, max_size=4).map(lambda fs: b"FLAGS (" + b" ".join(fs) + b")"),
    st.just(b'INTERNALDATE "06-May-2020 05:08:09 +0200"'),
    st.integers(1, 2**40).map(lambda n: b"MODSEQ (%d)" % n),
)


@given(
    st.integers(1, 10**6),
    st.lists(_item, max_size=4),
    st.lists(_item, max_size=2),
    st.binary(max_size=50),
    st.booleans(),
)
def test_fast_fetch_parser_agrees_with_imapclient(uid: int, before: list[bytes], after: list[bytes], body: bytes, with_body: bool) -> None:
    items = b" ".join([b"UID %d" % uid, *before])
    if with_body:
        lines: list[object] = [
            (b"7 (" + items + b" BODY[] {%d}" % len(body), body),
            b" ".join([b"", *after]) + b")" if after else b")",
        ]
    else:
        lines = [b"7 (" + items + b")"]
    fast = parse_fetch_fast(lines)
    assert fast is not None
    general = parse_fetch_general(lines)
    assert {k: {key: value for key, value in v.items() if key != b"SEQ"} for k, v in general.items()} == fast


def test_fast_parser_declines_other_shapes() -> None:
    assert parse_fetch_fast([b'7 (UID 1 X-GM-LABELS ("a b"))']) is None
    assert parse_fetch_fast([(b"7 (UID 1 BODY[HEADER] {2}", b"ab"), b")"]) is None


def test_temporary_login_failures_are_tried_again_and_wrong_passwords_are_not() -> None:
    from mailbackup.errors import AuthError
    from mailbackup.net import retry_temporary

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise AuthError("login failed: [UNAVAILABLE] Temporary authentication failure.")
        return "session"

    assert retry_temporary(flaky, delay=0.01) == "session" and len(calls) == 2

    def wrong() -> str:
        calls.append(1)
        raise AuthError("login failed: [AUTHENTICATIONFAILED] Authentication failed.")

    calls.clear()
    with pytest.raises(AuthError):
        retry_temporary(wrong, delay=0.01)
    assert len(calls) == 1
