#!/bin/bash
# End to end on a fresh Debian 12 machine: install what is missing, start a
# throwaway Dovecot on 127.0.0.1 with sample mail, back it up over implicit TLS
# into a Maildir archive, list the archive, and show that a rerun fetches nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tests/bootstrap.sh"
PY="$ROOT/.venv/bin/python"
MB="$ROOT/.venv/bin/mailbackup"

WORK=$(mktemp -d /tmp/mbdemo.XXXXXX)
chmod 755 "$WORK"
cleanup() { "$PY" "$ROOT/tests/servers/dovecot.py" stop "$WORK/dc" >/dev/null 2>&1 || true; }
trap cleanup EXIT

"$PY" "$ROOT/tests/servers/dovecot.py" start "$WORK/dc" > "$WORK/server.json"
"$PY" "$ROOT/tests/servers/dovecot.py" add-user "$WORK/dc" demo > "$WORK/user.json"
field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }
PORT=$(field "$WORK/server.json" imaps_port)
install -m 600 /dev/null "$WORK/password"
field "$WORK/user.json" password > "$WORK/password"
"$PY" "$ROOT/examples/demo_seed.py" "$WORK/dc" demo "$(cat "$WORK/password")"

SOURCE="imaps://demo@127.0.0.1:$PORT"
ARCHIVE="maildir:$WORK/archive"
CA="$WORK/dc/tls/cert.pem"
echo
echo "\$ mailbackup backup $SOURCE $ARCHIVE --ca-file $CA --password-file $WORK/password"
"$MB" backup "$SOURCE" "$ARCHIVE" --ca-file "$CA" --password-file "$WORK/password"
echo
echo "\$ mailbackup ls $ARCHIVE"
"$MB" ls "$ARCHIVE"
echo
echo "\$ mailbackup backup ... (again: incremental, nothing new)"
"$MB" backup "$SOURCE" "$ARCHIVE" --ca-file "$CA" --password-file "$WORK/password"
echo
echo "The archive stays in $WORK/archive (open a folder with: mutt -f $WORK/archive/INBOX)."
