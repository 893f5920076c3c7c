#!/bin/bash
# Idempotent setup of everything the test suite and the demo need, on Debian 12:
# the Debian packages (Dovecot, PostgreSQL, openssl, mutt, tmux, isync, offlineimap3), a virtualenv
# .venv at the repo root with mailbackup installed editable plus its test extra,
# and Cyrus IMAP unpacked (not installed) into .venv/cyrus/root.
# Installs only what is missing; a warm run takes well under a second.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { echo "bootstrap: $*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $* (no sudo found); install these packages by hand"
    fi
}

apt_updated=
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* yourself (Debian 12 expected)"
    say "installing Debian packages: $*"
    if [ -z "$apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
            || die "apt-get update failed"
        apt_updated=1
    fi
    # the postgresql package may start a system cluster on 5432: harmless, left alone
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >/dev/null || die "apt-get install $* failed"
}

# 1. Debian packages, checked by the files we use (dpkg-query is slower)
missing=()
[ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/imap ] || missing+=(dovecot-core dovecot-imapd)
[ -x /usr/lib/dovecot/pop3 ] || missing+=(dovecot-pop3d)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)
command -v mutt >/dev/null || missing+=(mutt)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v tmux >/dev/null || missing+=(tmux)
command -v mbsync >/dev/null || missing+=(isync)
command -v offlineimap >/dev/null || missing+=(offlineimap3)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# 2. Python 3.11+ virtualenv
PYTHON=${PYTHON:-$(command -v python3 || true)}
[ -n "$PYTHON" ] || die "python3 not found"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); mailbackup needs Python 3.11+"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        # Debian splits venv/ensurepip out of its python3 package
        apt_install "python3-venv"
    fi
    say "creating .venv with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv .venv || die "python3 -m venv .venv failed"
fi

# 3. mailbackup (editable) + test extra, redone only when pyproject.toml changes
STAMP=.venv/.mailbackup-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    [ -f mailbackup/__init__.py ] || die "mailbackup/__init__.py missing: nothing to install"
    say "installing mailbackup[test] into .venv (pip)"
    log=.venv/pip.log
    if ! { .venv/bin/python -m pip install -q --upgrade pip \
           && .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "pip install -e '.[test]' failed (full log: $ROOT/$log)"
    fi
    echo "$want" > "$STAMP"
fi

# 4. Cyrus IMAP for the interop tests.  cyrus-imapd and cyrus-pop3d conflict
# with dovecot-imapd/-pop3d (all provide imap-server/pop3-server) and
# cyrus-common pulls in an MTA, so their .debs are unpacked into .venv/cyrus/root
# (tests/servers/cyrus.py runs them from there) and only the libraries they link
# against, plus sasl2-bin for saslpasswd2, are installed.
CYRUS=.venv/cyrus
if [ ! -e "$CYRUS/.unpacked" ]; then
    apt_install sasl2-bin libclamav12 libical3 libicu72 libjansson4 libkrb5-3 libldap-2.5-0 \
        libpcre3 libpq5 libsasl2-modules libsasl2-modules-db libsqlite3-0 libwrap0 libxapian30 \
        libxml2 libzephyr4
    say "unpacking cyrus-imapd into $CYRUS/root"
    rm -rf "$CYRUS" && mkdir -p "$CYRUS/debs"
    (cd "$CYRUS/debs" && apt-get download -qq cyrus-common cyrus-imapd cyrus-pop3d) \
        >"$CYRUS/download.log" 2>&1 || { cat "$CYRUS/download.log" >&2; die "apt-get download cyrus-imapd failed"; }
    for deb in "$CYRUS"/debs/*.deb; do dpkg-deb -x "$deb" "$CYRUS/root"; done
    unresolved=$(LD_LIBRARY_PATH="$CYRUS/root/usr/lib/x86_64-linux-gnu" \
        ldd "$CYRUS/root/usr/lib/cyrus/bin/master" "$CYRUS/root/usr/lib/cyrus/bin/imapd" | grep 'not found' || true)
    [ -z "$unresolved" ] || die "Cyrus needs libraries that are not installed: $unresolved"
    rm -rf "$CYRUS/debs"
    touch "$CYRUS/.unpacked"
fi
