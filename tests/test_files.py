"""Pure byte helpers of the file stores: path mapping, CRLF folding, mboxrd quoting."""

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mailbackup.model import Folder
from mailbackup.stores.files import (
    crlf_foldable,
    line_chunks,
    quote_from,
    safe_part,
    safe_parts,
    unfold_crlf,
    unquote_from,
)


def test_hostile_folder_names_stay_inside(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    for name in ["..", "../../etc", "/etc/passwd", "a/../../b", ".", "", "x\x00y", "\\..\\x", ".hidden", "cur", "tmp"]:
        parts = safe_parts(Folder(name=name, delimiter="/"))
        target = (root / "/".join(parts)).resolve()
        assert target.is_relative_to(root), (name, parts)
        for part in parts:
            assert part not in ("", ".", "..", "cur", "new", "tmp")
            assert "/" not in part and "\x00" not in part and not part.startswith(".")


def test_delimiter_inside_a_part_is_escaped() -> None:
    # With '.' as delimiter a '/' inside a component must not make a directory.
    assert safe_parts(Folder(name="a/b.c", delimiter=".")) == ["a%2Fb", "c"]


def test_non_ascii_names_stay_readable() -> None:
    assert safe_part("Entwürfe") == "Entwürfe"
    assert safe_part("日本語") == "日本語"


def test_long_names_fit_a_file_name() -> None:
    assert len(safe_part("x" * 1000).encode()) < 255


@given(st.text(max_size=40), st.text(max_size=40))
def test_mapping_is_one_to_one(a: str, b: str) -> None:
    if a != b and len(a.encode("utf-8", "surrogatepass")) < 60 and len(b.encode("utf-8", "surrogatepass")) < 60:
        assert safe_part(a) != safe_part(b)


@given(st.binary(max_size=300))
def test_crlf_folding_is_exact_when_allowed(raw: bytes) -> None:
    if crlf_foldable(raw):
        assert unfold_crlf(raw.replace(b"\r\n", b"\n")) == raw


def test_bare_lf_is_not_foldable() -> None:
    assert not crlf_foldable(b"a\r\nb\nc\r\n")
    assert crlf_foldable(b"a\r\nb\r\r\n")


@given(st.lists(st.sampled_from([b"From ", b">From ", b">>From x", b"\n", b"\r\n", b"a", b">", b"F"]), max_size=60))
def test_mboxrd_quoting_reverses(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    quoted = quote_from(raw)
    assert unquote_from(quoted) == raw
    # no line of the quoted text can start a new message
    assert not any(line.startswith(b"From ") for line in quoted.split(b"\n"))


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=50))
def test_line_chunks_cover_the_message(raw: bytes, size: int) -> None:
    pieces = list(line_chunks(raw, size))
    assert b"".join(pieces) == raw
    for piece in pieces[:-1]:
        assert piece.endswith(b"\n")
