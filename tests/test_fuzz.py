"""Property tests on everything that parses bytes from a server or from disk."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailbackup.errors import ServerError
from mailbackup.mime import parse
from mailbackup.sources.imap import parse_fetch
from mailbackup.sources.pop3 import message_date, parse_id_lines
from mailbackup.stores.maildir import FLAG_LETTERS, flags_from_name, info

_system_flags = st.lists(st.sampled_from(sorted(FLAG_LETTERS)), unique=True)


@given(_system_flags)
def test_maildir_info_round_trips_standard_flags(flags: list[str]) -> None:
    name = "0" * 64 + ".lf" + info(flags)
    assert flags_from_name(name) == tuple(sorted(flags))
    assert info(flags) == info(list(reversed(flags)))  # one spelling per flag set


@given(st.text(max_size=30))
def test_maildir_info_of_any_file_name_never_fails(name: str) -> None:
    assert set(flags_from_name(name)) <= set(FLAG_LETTERS)


@settings(max_examples=300)
@given(st.lists(st.one_of(st.binary(max_size=60), st.tuples(st.binary(max_size=60), st.binary(max_size=30))), max_size=5))
def test_fetch_replies_parse_or_fail_cleanly(lines: list[object]) -> None:
    try:
        parsed = parse_fetch(lines)
    except ServerError:
        return
    assert all(isinstance(uid, int) for uid in parsed)


@given(st.lists(st.binary(max_size=20), max_size=5))
def test_pop3_listings_parse_or_fail_cleanly(lines: list[bytes]) -> None:
    try:
        parse_id_lines(lines)
    except ServerError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_any_message_bytes_give_a_date_choice(raw: bytes) -> None:
    when, how = message_date(raw)
    assert how in ("received", "date", "download") and (when is None) == (how == "download")


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_text_extraction_survives_any_bytes(raw: bytes) -> None:
    from mailbackup.mime import body_text

    body_text(parse(raw))  # the fast reader or the email package: never an exception
