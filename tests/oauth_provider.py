"""A stand-in OAuth2 authorization server for the tests; Google and Microsoft cannot be reached from here.

It is authlib's server side (RFC 6749 authorization-code and refresh grants, RFC 7636 PKCE,
RFC 8628 device authorization) behind a small WSGI app on 127.0.0.1, and it behaves as the
specs and the providers' documentation describe:

- The device grant answers `authorization_pending` until the user approves the code at the
  verification URI (GET /activate?user_code=..., which the test calls in the user's place), and
  `slow_down` when polled faster than `interval`.
- The authorization endpoint wants PKCE S256 from the public client and any port on a loopback
  redirect (RFC 8252 §7.3). It approves at once as `user` (the user is "already signed in") and
  redirects with code and state, as Google and Entra ID do.
- Every refresh rotates the refresh token. The old one dies once its successor has been used;
  until then it still works (a client whose answer was lost can retry, as with Auth0's and
  Okta's rotation). Presenting a dead one revokes the whole grant (RFC 9700 §4.14.2). This is
  stricter than Microsoft, whose documentation says old refresh tokens are not revoked on use.
- `revoke()` and `expire()` end a grant on demand: the next refresh gets `invalid_grant`, as
  Google answers a revoked or 7-day "Testing" token and Entra ID a stale one (AADSTS700082).
- POST /introspect answers Dovecot's oauth2 passdb (RFC 7662 form, no client auth, as
  tests/servers/dovecot.sh configures it), so IMAP logins with issued tokens are real.
- `stall_refreshes(seconds)` holds refresh answers after the rotation is committed, so a test
  can kill the client while its answer is in flight; `stall_logins()` holds the introspection
  answers, so a test can look at the client while it is logging in with its new access token.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.util import request_uri

from authlib.common.security import generate_token
from authlib.oauth2 import AuthorizationServer, OAuth2Error, OAuth2Request
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc8628 import DeviceAuthorizationEndpoint, DeviceCodeGrant, DeviceCredentialDict

CLIENT_ID = "mailbackup-test-client"
ACCESS_LIFETIME = 3600


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    """A public client (no secret), like an Entra ID "public client" or a Google "Desktop app"."""

    client_id: str = CLIENT_ID

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        parts = urlsplit(redirect_uri)
        return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost")

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token", DeviceCodeGrant.GRANT_TYPE)


@dataclass
class RefreshToken:
    value: str
    user: str
    scope: str
    grant: str
    expires_at: float
    successor: str | None = None
    used: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == CLIENT_ID

    def get_scope(self) -> str:
        return self.scope


@dataclass
class Code:
    code: str
    user: str
    scope: str
    redirect_uri: str
    challenge: str | None
    challenge_method: str | None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class State:
    lock: threading.RLock = field(default_factory=threading.RLock)
    codes: dict[str, Code] = field(default_factory=dict)
    devices: dict[str, DeviceCredentialDict] = field(default_factory=dict)
    approved: dict[str, str] = field(default_factory=dict)  # user_code -> user
    last_poll: dict[str, float] = field(default_factory=dict)
    refresh: dict[str, RefreshToken] = field(default_factory=dict)
    access: dict[str, tuple[str, float, str]] = field(default_factory=dict)  # token -> user, expires_at, grant
    revoked_grants: set[str] = field(default_factory=set)
    introspected: list[str] = field(default_factory=list)


class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        self.server.state.codes[code] = Code(
            code, request.user, request.scope or "", data.get("redirect_uri", ""),
            data.get("code_challenge"), data.get("code_challenge_method"),
        )

    def query_authorization_code(self, code: str, client: Client) -> Code | None:
        return self.server.state.codes.get(code)

    def delete_authorization_code(self, authorization_code: Code) -> None:
        self.server.state.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: Code) -> str:
        return authorization_code.user


class PKCE(CodeChallenge):  # type: ignore[misc]
    def get_authorization_code_challenge(self, authorization_code: Code) -> str | None:
        return authorization_code.challenge

    def get_authorization_code_challenge_method(self, authorization_code: Code) -> str | None:
        return authorization_code.challenge_method


class RotatingRefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        state: State = self.server.state
        record = state.refresh.get(refresh_token)
        if record is None or record.grant in state.revoked_grants or record.expires_at < time.time():
            return None
        if record.successor is not None and state.refresh[record.successor].used:
            state.revoked_grants.add(record.grant)  # a dead token came back: assume it leaked
            return None
        record.used = True
        return record

    def authenticate_user(self, refresh_token: RefreshToken) -> str:
        return refresh_token.user

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        pass  # save_token links old -> new; the old one dies when the new one is first used


class DeviceGrant(DeviceCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    def query_device_credential(self, device_code: str) -> DeviceCredentialDict | None:
        return self.server.state.devices.get(device_code)

    def query_user_grant(self, user_code: str) -> tuple[str, bool] | None:
        user = self.server.state.approved.get(user_code)
        return (user, True) if user else None

    def should_slow_down(self, credential: DeviceCredentialDict) -> bool:
        state: State = self.server.state
        now = time.time()
        last = state.last_poll.get(credential["device_code"])
        state.last_poll[credential["device_code"]] = now
        return last is not None and now - last < credential["interval"] - 0.2


class DeviceEndpoint(DeviceAuthorizationEndpoint):  # type: ignore[misc]
    INTERVAL = 1  # seconds; Google and Entra ID say 5

    def get_verification_uri(self) -> str:
        return self.server.base_url + "/activate"

    def save_device_credential(self, client_id: str, scope: str, data: dict[str, Any]) -> None:
        self.server.state.devices[data["device_code"]] = DeviceCredentialDict(
            client_id=client_id, scope=scope, expires_at=time.time() + data["expires_in"], **data
        )


class WsgiRequest(OAuth2Request):  # type: ignore[misc]
    def __init__(self, environ: dict[str, Any], form: dict[str, str]) -> None:
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
        super().__init__(environ["REQUEST_METHOD"], request_uri(environ), headers=headers)
        self._args = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        self._form = form
        self.payload = BasicOAuth2Payload({**self._args, **form})

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class Provider(AuthorizationServer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.state = State()
        self.user = "nobody"  # who is "signed in" in the browser
        self.base_url = ""
        self.stall, self.stalls_left = 0.0, 0
        self.hold_logins = False
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.register_token_generator(
            "default",
            BearerTokenGenerator(lambda **_: generate_token(40), lambda **_: generate_token(48), ACCESS_LIFETIME),
        )
        self.register_grant(CodeGrant, [PKCE(required=True)])
        self.register_grant(RotatingRefreshGrant)
        self.register_grant(DeviceGrant)
        self.register_endpoint(DeviceEndpoint)
        self._http: WSGIServer | None = None

    # -- authlib's hooks -------------------------------------------------------------
    def query_client(self, client_id: str) -> Client | None:
        return Client() if client_id == CLIENT_ID else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        state = self.state
        old: RefreshToken | None = request.refresh_token
        grant = old.grant if old else secrets.token_hex(8)
        state.access[token["access_token"]] = (request.user, time.time() + token["expires_in"], grant)
        if "refresh_token" in token:
            new = token["refresh_token"]
            state.refresh[new] = RefreshToken(new, request.user, token.get("scope", ""), grant, time.time() + 90 * 86400)
            if old is not None:
                if old.successor is not None:  # only the newest successor counts
                    state.refresh[old.successor].expires_at = 0
                old.successor = new

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        return request if isinstance(request, OAuth2Request) else WsgiRequest(*request)

    def handle_response(self, status: int, body: Any, headers: Iterable[tuple[str, str]]) -> tuple[int, bytes, list[tuple[str, str]]]:
        data = json.dumps(body).encode() if isinstance(body, dict) else str(body or "").encode()
        return status, data, list(headers)

    # -- what a test does to the provider --------------------------------------------
    def approve(self, user_code: str, user: str | None = None) -> None:
        with self.state.lock:
            self.state.approved[user_code] = user or self.user

    def revoke(self, user: str | None = None) -> None:
        """The user removes the app's access (or an admin revokes the sessions)."""
        with self.state.lock:
            for record in self.state.refresh.values():
                if user is None or record.user == user:
                    self.state.revoked_grants.add(record.grant)

    def expire(self) -> None:
        """Every refresh token ages past its lifetime (Google's 7 days in Testing, Entra's inactivity limit)."""
        with self.state.lock:
            for record in self.state.refresh.values():
                record.expires_at = 0

    def refresh_token_works(self, value: str) -> bool:
        """Would a refresh with `value` succeed now? (Asks without spending it.)"""
        with self.state.lock:
            record = self.state.refresh.get(value)
            if record is None or record.grant in self.state.revoked_grants or record.expires_at < time.time():
                return False
            return record.successor is None or not self.state.refresh[record.successor].used

    def stall_refreshes(self, seconds: float, count: int = 1_000_000) -> None:
        """Hold the next `count` refresh answers for `seconds` after committing the rotation."""
        self.stall, self.stalls_left = seconds, count
        self.stalled.clear()
        self.released.clear()

    def stall_logins(self) -> None:
        """Hold Dovecot's introspection answers: an IMAP login with an access token hangs until release()."""
        self.hold_logins = True
        self.stalled.clear()
        self.released.clear()

    def release(self) -> None:
        """Send the held answers now and stall no more."""
        self.stall, self.stalls_left, self.hold_logins = 0.0, 0, False
        self.released.set()

    # -- HTTP ------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        form = {}
        if environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            form = {k: v[0] for k, v in parse_qs(environ["wsgi.input"].read(length).decode()).items()}
        request = (environ, form)
        stall = 0.0
        with self.state.lock:
            if path == "/authorize":
                status, body, headers = self._authorize(self.create_oauth2_request(request))
            elif path == "/token":
                status, body, headers = self.create_token_response(request)
                if form.get("grant_type") == "refresh_token" and status == 200 and self.stalls_left > 0:
                    stall, self.stalls_left = self.stall, self.stalls_left - 1
            elif path == "/device":
                status, body, headers = self.create_endpoint_response("device_authorization", request)
            elif path == "/activate":
                self.approve(parse_qs(environ.get("QUERY_STRING", "")).get("user_code", [""])[0])
                status, body, headers = 200, b"approved", [("Content-Type", "text/plain")]
            elif path == "/introspect":
                status, body, headers = self._introspect(form.get("token", ""))
                if self.hold_logins:
                    stall = 60.0
            else:
                status, body, headers = 404, b"not found", [("Content-Type", "text/plain")]
        if stall:  # the rotation is committed; the answer is late
            self.stalled.set()
            self.released.wait(stall)
        start_response(f"{status} {'OK' if status < 400 else 'Error'}", [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def _authorize(self, request: OAuth2Request) -> tuple[int, bytes, list[tuple[str, str]]]:
        """The user is signed in and consents at once; the answer is the redirect to the client."""
        try:
            grant = self.get_consent_grant(request, end_user=self.user)
        except OAuth2Error as error:
            return self.handle_error_response(request, error)  # type: ignore[no-any-return]
        return self.create_authorization_response(request, grant_user=self.user, grant=grant)  # type: ignore[no-any-return]

    def _introspect(self, token: str) -> tuple[int, bytes, list[tuple[str, str]]]:
        self.state.introspected.append(token)
        user, expires_at, grant = self.state.access.get(token, ("", 0.0, ""))
        active = bool(user) and expires_at > time.time() and grant not in self.state.revoked_grants
        body = {"active": True, "username": user} if active else {"active": False}
        return 200, json.dumps(body).encode(), [("Content-Type", "application/json")]

    def start(self) -> Provider:
        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        self._http = make_server("127.0.0.1", 0, self, server_class=Server, handler_class=Quiet)
        self.base_url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def config_table(self, **extra: str) -> str:
        """The account's `oauth2 = {...}` line for this provider (provider = "custom")."""
        fields = {
            "provider": "custom",
            "client_id": CLIENT_ID,
            "authorization_url": f"{self.base_url}/authorize",
            "token_url": f"{self.base_url}/token",
            "device_authorization_url": f"{self.base_url}/device",
            "token_store": "file",
            **extra,
        }
        inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
        return f'oauth2 = {{ {inner}, scopes = ["mail"] }}'


def running() -> Iterator[Provider]:
    provider = Provider().start()
    try:
        yield provider
    finally:
        provider.stop()
