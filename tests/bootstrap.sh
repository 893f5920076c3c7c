#!/bin/bash
# Idempotent setup of everything the test suite and the demo need, on Debian 12:
# the Debian packages (Dovecot, PostgreSQL, openssl, mutt) and a virtualenv
# .venv at the repo root with mailbackup installed editable plus its test extra.
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
