"""The test servers and fixtures behave as the rest of the suite assumes."""

from __future__ import annotations

import poplib
import ssl
from datetime import datetime, timezone

import sqlalchemy as sa
from corpus.tricky import as_dovecot_serves
from imapclient import IMAPClient
from servers.dovecot import Account, Dovecot


def _tls(dovecot: Dovecot) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.cert_path))


def test_plain_login_offers_starttls_and_condstore(dovecot: Dovecot, account: Account) -> None:
    with dovecot.client(account) as imap:
        capabilities = imap.capabilities()
    assert b"STARTTLS" not in capabilities  # not offered after login
    with IMAPClient(dovecot.host, account.port("imap"), ssl=False) as imap:
        assert b"STARTTLS" in imap.capabilities()
        imap.login(account.user, account.password)
        assert {b"CONDSTORE", b"QRESYNC", b"UIDPLUS", b"SPECIAL-USE"} <= set(imap.capabilities())


def test_starttls_verifies_against_the_cert(dovecot: Dovecot, account: Account) -> None:
    with IMAPClient(dovecot.host, account.port("imap"), ssl=False) as imap:
        imap.starttls(_tls(dovecot))
        imap.login(account.user, account.password)
        assert imap.folder_exists("INBOX")


def test_implicit_tls_on_imaps(dovecot: Dovecot, account: Account) -> None:
    with dovecot.client(account, tls=True) as imap:
        assert imap.select_folder("INBOX")[b"EXISTS"] == 0


def test_pop3_stat_on_plain_and_tls(dovecot: Dovecot, account: Account) -> None:
    dovecot.append(account, "INBOX", b"Subject: pop\r\n\r\nhello\r\n")
    for pop in (poplib.POP3(dovecot.host, account.port("pop3"), timeout=10),
                poplib.POP3_SSL(dovecot.host, account.port("pop3s"), context=_tls(dovecot),
                                timeout=10)):
        pop.user(account.user)
        pop.pass_(account.password)
        assert pop.stat() == (1, len(b"Subject: pop\r\n\r\nhello\r\n"))
        pop.quit()


def test_user_added_at_runtime_logs_in_at_once(dovecot: Dovecot) -> None:
    named = dovecot.add_user("runtime_user")
    with dovecot.client(named) as imap:
        assert imap.folder_exists("INBOX")
    assert named.url("imaps") == f"imaps://runtime_user@127.0.0.1:{dovecot.imaps_port}"


def test_wrong_password_is_refused(dovecot: Dovecot, account: Account) -> None:
    with IMAPClient(dovecot.host, account.port("imap"), ssl=False) as imap:
        try:
            imap.login(account.user, "wrong")
        except Exception as exc:
            assert "AUTHENTICATIONFAILED" in str(exc)
        else:
            raise AssertionError("login with a wrong password succeeded")


def test_special_use_attribute_on_created_sent(dovecot: Dovecot, account: Account) -> None:
    with dovecot.client(account) as imap:
        assert [name for _, _, name in imap.list_folders()] == ["INBOX"]  # auto = no
        imap.create_folder("Sent")
        listed = {name: flags for flags, _, name in imap.list_folders()}
        assert b"\\Sent" in listed["Sent"]
        # RFC 6154 LIST-EXTENDED selection: only special-use mailboxes that exist
        typ, _ = imap._imap._simple_command("LIST", "(SPECIAL-USE)", '""', "*")
        _, lines = imap._imap._untagged_response(typ, [None], "LIST")
        assert lines == [b'(\\Sent) "/" Sent']


def test_append_keeps_flags_and_internal_date(dovecot: Dovecot, account: Account) -> None:
    when = datetime(2021, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    uid = dovecot.append(account, "Archive/2021", b"Subject: a\r\n\r\nb\r\n", ["\\Seen"], when)
    [message] = dovecot.fetch(account, "Archive/2021")
    assert message.uid == uid
    assert b"\\Seen" in message.flags
    assert message.internal_date == when


def test_tricky_messages_come_back_as_notes_say(dovecot: Dovecot, account: Account,
                                                tricky_messages: dict[str, bytes]) -> None:
    for raw in tricky_messages.values():
        dovecot.append(account, "Tricky", raw)
    served = dovecot.folder_bodies(account)["Tricky"]
    expected = [as_dovecot_serves(raw) for raw in tricky_messages.values()]
    assert served == expected
    names = list(tricky_messages)
    assert served[names.index("no_trailing_newline")].endswith(b"EOL")
    assert served[names.index("bare_lf")] != tricky_messages["bare_lf"]


def test_seed_maildir_is_visible_over_imap(dovecot: Dovecot, account: Account) -> None:
    count = dovecot.seed_maildir(account, "Entwürfe/2024", [
        (b"Subject: one\n\n1\n", "S", 1_600_000_000.0),
        (b"Subject: two\r\n\r\n2\r\n", "FS", 1_600_000_100.0),
    ])
    assert count == 2
    assert (dovecot.maildir(account) / ".Entw&APw-rfe.2024" / "cur").is_dir()
    messages = dovecot.fetch(account, "Entwürfe/2024")
    assert [m.raw for m in messages] == [b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n"]
    assert b"\\Flagged" in messages[1].flags
    assert messages[0].internal_date.timestamp() == 1_600_000_000


def test_recreate_folder_changes_uid_validity(dovecot: Dovecot, account: Account) -> None:
    dovecot.append(account, "Box", b"Subject: x\r\n\r\ny\r\n")
    old = dovecot.uid_validity(account, "Box")
    assert dovecot.recreate_folder(account, "Box") != old
    assert dovecot.folder_bodies(account)["Box"] == []


def test_dot_instance_uses_dot_separator(dovecot_dot: Dovecot, account_dot: Account) -> None:
    dovecot_dot.append(account_dot, "Archive.2024", b"Subject: d\r\n\r\nd\r\n")
    with dovecot_dot.client(account_dot) as imap:
        listed = {name: delimiter for _, delimiter, name in imap.list_folders()}
    assert listed["Archive.2024"] == b"."
    assert "Archive.2024" in dovecot_dot.folder_bodies(account_dot)


def test_doveadm_talks_to_this_instance(dovecot: Dovecot, account: Account) -> None:
    dovecot.append(account, "Counted", b"Subject: c\r\n\r\nc\r\n")
    assert "messages=1" in dovecot.doveadm("mailbox", "status", "-u", account.user,
                                           "messages", "Counted")


def test_postgres_url_connects(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("select 1")).scalar() == 1
            assert connection.execute(sa.text("select current_database()")).scalar() \
                == pg_url.split("/")[3].split("?")[0]
    finally:
        engine.dispose()


def test_corpus_is_present_byte_for_byte(corpus_dir) -> None:
    assert (corpus_dir / "mikel-mail" / "LICENSE").exists()
    crlf = [p for p in (corpus_dir / "mikel-mail").rglob("*") if p.is_file() and b"\r\n" in p.read_bytes()]
    assert crlf, "CRLF files lost their line endings: check .gitattributes"


