#!/bin/bash
# Private, throw-away Dovecot for mailbackup's tests, benchmarks and demo.
# Listens on 127.0.0.1 only.  Project copy of the shared recipe, extended with
# a configurable hierarchy separator and special-use mailboxes.
#
#   dovecot.sh start  DIR [PORT_IMAP=10143] [PORT_POP3=10110] [PORT_IMAPS=10993] [PORT_POP3S=10995]
#   dovecot.sh stop   DIR
#   dovecot.sh status DIR
#
# Everything lives in DIR: dovecot.conf, passwd, tls/, run/ (base_dir),
# state/, mail/<user>/ (Maildir++), dovecot.log.  Users: alice, bob, carol,
# dave; password = "pw-<user>" (see USERS below).  Mail files are owned by the
# owner of DIR, or to MAIL_USER (default nobody) when DIR is owned by root.  Works as root (CI) and
# as an ordinary user (chroots disabled, all services run as that user).
# A TLS listener (self-signed cert, made with openssl) is on PORT_IMAPS/POP3S;
# set PORT_IMAPS=0 PORT_POP3S=0 to disable TLS entirely (ssl=no).
# SEPARATOR (default /) is the inbox namespace's hierarchy separator.
# Sent, Drafts, Trash, Junk and Archive carry SPECIAL-USE attributes but are
# not auto-created.  Users can be added while it runs: append a line to
# DIR/passwd (seen from the next second on) or write DIR/users/NAME (at once).
# MASTER_USER=NAME:PASSWORD adds a master user (admin logins): SASL PLAIN with
# authzid alice and authcid NAME, or LOGIN as "alice*NAME", opens alice's mail.
set -euo pipefail
USERS="alice bob carol dave"

cmd=${1:?usage: dovecot.sh start|stop|status DIR [imap pop3 imaps pop3s]}
DIR=${2:?DIR missing}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/dovecot.conf
PIDFILE=$DIR/run/master.pid

is_running() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case $cmd in
status)
    if is_running; then echo "running pid $(cat "$PIDFILE")"; else echo stopped; exit 1; fi ;;
stop)
    if ! is_running; then echo "dovecot not running in $DIR"; exit 0; fi
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid"              # same as: doveadm -c "$CONF" stop
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "dovecot $pid did not stop" >&2; exit 1; fi
    echo "dovecot $pid stopped" ;;
start)
    P_IMAP=${3:-10143} P_POP3=${4:-10110} P_IMAPS=${5:-10993} P_POP3S=${6:-10995}
    SEPARATOR=${SEPARATOR:-/}
    case $SEPARATOR in /|.) ;; *) echo "SEPARATOR must be / or ." >&2; exit 2 ;; esac
    if is_running; then echo "already running pid $(cat "$PIDFILE")"; exit 0; fi
    # unix socket paths (sun_path) are limited to 107 bytes: keep DIR short
    if [ ${#DIR} -gt 60 ]; then echo "DIR path too long for dovecot sockets: $DIR" >&2; exit 2; fi
    # dovecot's unprivileged auth/login processes must traverse DIR (mktemp -d makes 0700)
    chmod 755 "$DIR"
    mkdir -p "$DIR/mail" "$DIR/state" "$DIR/tls" "$DIR/users"
    # Mail processes may not run as uid 0 (hard check, not first_valid_uid), so
    # as root the mail files belong to MAIL_USER (default nobody); otherwise to
    # the owner of DIR.  Anything written into DIR/mail by hand must be chowned.
    if [ "$(stat -c %u "$DIR")" = 0 ]; then
        uid=$(id -u "${MAIL_USER:-nobody}") gid=$(id -g "${MAIL_USER:-nobody}")
    else
        uid=$(stat -c %u "$DIR") gid=$(stat -c %g "$DIR")
    fi
    chown "$uid:$gid" "$DIR/mail"
    # one line per user; later users are appended the same way (no rewrite)
    : > "$DIR/passwd"
    for u in $USERS; do
        echo "$u:{PLAIN}pw-$u::::$DIR/mail/$u::" >> "$DIR/passwd"
    done
    chmod 644 "$DIR/passwd"   # read by the auth process (runs as user 'dovecot' when root)
    chmod 755 "$DIR/users"
    master_passdb=
    if [ -n "${MASTER_USER:-}" ]; then
        echo "${MASTER_USER%%:*}:{PLAIN}${MASTER_USER#*:}" > "$DIR/master"
        chmod 644 "$DIR/master"
        master_passdb="auth_master_user_separator = *
passdb {
  driver = passwd-file
  master = yes
  args = scheme=PLAIN $DIR/master
  result_success = continue
}"
    fi

    ssl=no
    if [ "$P_IMAPS" != 0 ] || [ "$P_POP3S" != 0 ]; then
        ssl=yes
        if [ ! -s "$DIR/tls/cert.pem" ]; then
            openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=localhost \
                -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
                -keyout "$DIR/tls/key.pem" -out "$DIR/tls/cert.pem" 2>/dev/null
        fi
    fi

    anvil_chroot=
    if [ "$(id -u)" = 0 ]; then
        privs="default_internal_user = dovecot
default_login_user = dovenull"
    else   # rootless: no chroot, every service runs as the invoking user
        anvil_chroot="chroot ="
        me=$(id -un) mygrp=$(id -gn)
        privs="default_internal_user = $me
default_internal_group = $mygrp
default_login_user = $me
service imap-login {
  chroot =
}
service pop3-login {
  chroot =
}"
    fi

    if [ -n "${OAUTH2_URL:-}" ]; then   # token introspection by POST to a local endpoint
        printf 'introspection_mode = post\nintrospection_url = %s\nusername_attribute = username\nactive_attribute = active\nactive_value = true\nforce_introspection = yes\n' \
            "$OAUTH2_URL" > "$DIR/oauth2.conf.ext"
        chmod 644 "$DIR/oauth2.conf.ext"
    fi
    cat > "$CONF" <<EOF
# generated by tests/servers/dovecot.sh -- self-contained, does not read /etc/dovecot
instance_name = bench-$P_IMAP
base_dir = $DIR/run
state_dir = $DIR/state
log_path = $DIR/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = $ssl
$( [ $ssl = yes ] && printf 'ssl_cert = <%s\nssl_key = <%s\n' "$DIR/tls/cert.pem" "$DIR/tls/key.pem")
disable_plaintext_auth = no
# tests log in hundreds of times from 127.0.0.1, some with wrong passwords on
# purpose: no failure delay, and no anvil auth penalty (up to 15 s per login
# from 127.0.0.1 after a failure; mode 0 on its socket disables it)
auth_failure_delay = 0
service anvil {
  $anvil_chroot
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
auth_mechanisms = plain login${OAUTH2_URL:+ xoauth2 oauthbearer}
mail_location = maildir:$DIR/mail/%u
mail_max_userip_connections = 50
$privs
namespace inbox {
  inbox = yes
  separator = $SEPARATOR
  mailbox Sent {
    special_use = \\Sent
    auto = no
  }
  mailbox Drafts {
    special_use = \\Drafts
    auto = no
  }
  mailbox Trash {
    special_use = \\Trash
    auto = no
  }
  mailbox Junk {
    special_use = \\Junk
    auto = no
  }
  mailbox Archive {
    special_use = \\Archive
    auto = no
  }
}
# DIR/passwd takes appended lines, but auth re-stats it at most once per
# second, so a user appended in the same second as another login is unknown
# until the next second.  DIR/users/NAME (one passwd line each) is looked up
# afresh every time: the way to add a user that can log in at once.
$( [ -n "${OAUTH2_URL:-}" ] && printf 'passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = %s\n}\n' "$DIR/oauth2.conf.ext")
$master_passdb
passdb {
  driver = passwd-file
  args = scheme=PLAIN $DIR/passwd
}
passdb {
  driver = passwd-file
  args = scheme=PLAIN $DIR/users/%u
}
userdb {
  driver = passwd-file
  args = $DIR/passwd
  default_fields = uid=$uid gid=$gid
}
userdb {
  driver = passwd-file
  args = $DIR/users/%u
  default_fields = uid=$uid gid=$gid
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $P_IMAP
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $P_IMAPS
    ssl = yes
  }
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $P_POP3
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $P_POP3S
    ssl = yes
  }
}
EOF
    # forks into the background and writes $PIDFILE; its stdio must not hold
    # the caller's pipes open (subprocess capture would wait forever)
    dovecot -c "$CONF" </dev/null >>"$DIR/dovecot.log" 2>&1
    for _ in $(seq 50); do
        is_running && (exec 3<>/dev/tcp/127.0.0.1/$P_IMAP) 2>/dev/null && break
        sleep 0.1
    done
    if ! is_running; then echo "dovecot failed to start, see $DIR/dovecot.log" >&2; tail -n 5 "$DIR/dovecot.log" >&2; exit 1; fi
    echo "dovecot pid $(cat "$PIDFILE") imap=127.0.0.1:$P_IMAP pop3=$P_POP3 imaps=$P_IMAPS pop3s=$P_POP3S conf=$CONF" ;;
*)
    echo "unknown command $cmd" >&2; exit 2 ;;
esac
