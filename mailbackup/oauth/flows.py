"""Sign in (device grant, RFC 8628, or authorization code + PKCE on a loopback redirect, RFC 7636/8252)
and refresh, through authlib's OAuth2Session.

A rotated refresh token is saved before the new access token is handed out, under the
grant's lock, so a crash or a second run can never leave a spent token behind.
"""

from __future__ import annotations

import logging
import time
import webbrowser
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import (
    AuthError,
    ConfigError,
    ConnectError,
    ServerError,
    SignInRequired,
    setting,
)
from .settings import OAuth2Settings
from .store import TokenStore

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
HTTP_TIMEOUT = 30.0
log = logging.getLogger("mailbackup")
Say = Callable[[str], None]


def store_for(settings: OAuth2Settings) -> TokenStore:
    return TokenStore(settings.store_key, settings.token_store)


def _require_authlib() -> None:
    try:
        import authlib.integrations.requests_client  # noqa: F401
    except ImportError:
        raise ConfigError("oauth2 = {...} needs the 'oauth' extra: pip install 'mailbackup[oauth]'") from None


def _session(settings: OAuth2Settings, *, scoped: bool = True, **extra: Any) -> Any:
    from authlib.integrations.requests_client import OAuth2Session

    secret = settings.client_secret()
    return OAuth2Session(
        client_id=settings.client_id,
        client_secret=secret,
        token_endpoint_auth_method="client_secret_post" if secret else "none",
        scope=" ".join(settings.scopes) if scoped else None,
        default_timeout=HTTP_TIMEOUT,
        **extra,
    )


def _one_line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _provider_call(settings: OAuth2Settings, what: str, call: Callable[[], Any]) -> Any:
    """Run one request; network and protocol failures become mailbackup errors (exit 3)."""
    import requests
    from authlib.integrations.base_client import OAuthError

    try:
        return call()
    except OAuthError as exc:
        if exc.error == "invalid_grant":
            detail = f" ({_one_line(exc.description)})" if exc.description else ""
            raise SignInRequired(
                f"the OAuth2 sign-in of account {settings.account} has expired or was revoked{detail}; "
                f"sign in again with: {settings.login_command}"
            ) from None
        raise
    except requests.HTTPError as exc:  # a 5xx: the provider is down for now
        host = urlsplit(settings.token_url).hostname
        raise ConnectError(f"{what}: {host} answered HTTP {exc.response.status_code if exc.response is not None else 'an error'}; try again later") from None
    except requests.RequestException as exc:
        host = urlsplit(settings.token_url).hostname
        raise ConnectError(f"{what}: cannot reach {host}: {_one_line(exc)}") from None
    except ValueError as exc:  # not a JSON object: a gateway's error page
        raise ServerError(f"{what}: the provider sent an answer that is not a token: {_one_line(exc)}") from None


def access_token(settings: OAuth2Settings, store: TokenStore | None = None) -> str:
    """A fresh access token from the stored refresh token; a rotated refresh token is saved first."""
    _require_authlib()
    from authlib.integrations.base_client import OAuthError

    store = store or store_for(settings)
    with store.locked():
        found = store.load()
        if found is None:
            raise SignInRequired(f"account {settings.account} is not signed in; run: {settings.login_command}")
        refresh_token, where = found
        # Google ignores scope on refresh; Entra ID wants it (a subset of what was granted).
        session = _session(settings, scoped=settings.provider != "google")
        try:
            token = _provider_call(
                settings, "refreshing the OAuth2 token",
                lambda: session.refresh_token(settings.token_url, refresh_token=refresh_token),
            )
        except OAuthError as exc:
            raise AuthError(f"the provider refused the token refresh: {exc.error} {_one_line(exc.description or '')}".rstrip()) from None
        rotated = token.get("refresh_token")
        if rotated and rotated != refresh_token:
            store.save(rotated, where)
    if not token.get("access_token"):
        raise ServerError("the provider's token answer has no access_token")
    return str(token["access_token"])


def login(
    settings: OAuth2Settings,
    *,
    device: bool,
    say: Say,
    open_browser: Callable[[str], Any] = webbrowser.open,
    timeout: float = 600.0,
    store: TokenStore | None = None,
) -> str:
    """Sign in interactively and store the refresh token; returns where it was stored."""
    _require_authlib()
    from authlib.integrations.base_client import OAuthError

    store = store or store_for(settings)
    try:
        token = _device_login(settings, say, timeout) if device else _browser_login(settings, say, open_browser, timeout)
    except OAuthError as exc:
        detail = f": {_one_line(exc.description)}" if exc.description else ""
        raise AuthError(f"sign-in failed: {exc.error}{detail}") from None
    refresh_token = token.get("refresh_token")
    if not refresh_token:
        hint = "the scopes need offline_access" if settings.provider != "google" else "access_type=offline was ignored"
        raise AuthError(f"the provider issued no refresh token ({hint}), so later runs could not sign in by themselves")
    with store.locked():
        return store.save(str(refresh_token))


def _device_login(settings: OAuth2Settings, say: Say, timeout: float) -> Any:
    from authlib.integrations.base_client import OAuthError

    if settings.provider == "google":
        raise ConfigError(
            "Google's device flow does not allow the Gmail scope (https://mail.google.com/); "
            f"sign in without {setting('device')}: {settings.login_command}"
        )
    if not settings.device_authorization_url:
        raise ConfigError(f"account {settings.account}: {setting('device')} needs device_authorization_url in its oauth2 table")
    session = _session(settings)
    data = {"client_id": settings.client_id, "scope": " ".join(settings.scopes)}
    if session.client_secret:
        data["client_secret"] = session.client_secret

    def start() -> dict[str, Any]:
        answer = session.post(
            settings.device_authorization_url, data=data, headers={"Accept": "application/json"}, withhold_token=True
        )
        try:
            body = answer.json()
        except ValueError:  # requests' JSONDecodeError is a RequestException too: not a network failure
            body = None
        if not isinstance(body, dict):
            raise ValueError(f"HTTP {answer.status_code}")
        if "error" in body:
            raise OAuthError(error=body["error"], description=body.get("error_description"))
        return body

    grant = _provider_call(settings, "starting the device sign-in", start)
    # Google's older answers say verification_url; RFC 8628 says verification_uri.
    uri = grant.get("verification_uri") or grant.get("verification_url")
    if not grant.get("device_code") or not grant.get("user_code") or not uri:
        raise ServerError("the device authorization answer lacks device_code, user_code or verification_uri")
    say(f"To sign in, open {uri} and enter the code {grant['user_code']}")
    if grant.get("verification_uri_complete"):
        say(f"(or open {grant['verification_uri_complete']})")
    interval = float(grant.get("interval") or 5)
    deadline = time.monotonic() + min(float(grant.get("expires_in") or timeout), timeout)
    while True:
        time.sleep(interval)
        if time.monotonic() > deadline:
            raise AuthError("the sign-in code expired before it was approved; run login again")
        try:
            return _provider_call(
                settings, "waiting for the sign-in",
                lambda: session.fetch_token(settings.token_url, grant_type=DEVICE_GRANT, device_code=grant["device_code"]),
            )
        except OAuthError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":  # RFC 8628 §3.5: add 5 seconds, for this and every later poll
                interval += 5
                continue
            if exc.error == "access_denied":
                raise AuthError("the sign-in was declined") from None
            if exc.error == "expired_token":
                raise AuthError("the sign-in code expired before it was approved; run login again") from None
            raise


def _browser_login(settings: OAuth2Settings, say: Say, open_browser: Callable[[str], Any], timeout: float) -> Any:
    from authlib.common.security import generate_token

    if not settings.authorization_url:
        raise ConfigError(f"account {settings.account}: signing in with a browser needs authorization_url; or use {setting('device')}")
    listener = LoopbackListener()
    try:
        redirect_uri = f"http://{settings.redirect_host}:{listener.port}/"
        session = _session(settings, redirect_uri=redirect_uri, code_challenge_method="S256")
        verifier = generate_token(64)  # RFC 7636 §4.1: 43 to 128 characters
        extra = {"access_type": "offline", "prompt": "consent"} if settings.provider == "google" else {}
        url, state = session.create_authorization_url(settings.authorization_url, code_verifier=verifier, **extra)
        say(f"Sign in in your browser. If none opens, open this URL:\n{url}")
        try:
            open_browser(url)
        except Exception as exc:  # noqa: BLE001 - no browser is fine: the URL is printed
            log.debug("no browser: %s", exc)
        query = listener.wait(state, timeout)
    finally:
        listener.close()
    params = parse_qs(query)
    if "error" in params:
        description = params.get("error_description", [""])[0]
        raise AuthError(f"sign-in failed: {params['error'][0]}{': ' + _one_line(description) if description else ''}")
    return _provider_call(
        settings, "redeeming the sign-in code",
        lambda: session.fetch_token(
            settings.token_url, authorization_response=f"{redirect_uri}?{query}", code_verifier=verifier, state=state
        ),
    )


class LoopbackListener:
    """The redirect target on 127.0.0.1 (RFC 8252 §7.3): takes the one answer whose state matches."""

    def __init__(self) -> None:
        self.expected: str | None = None
        self.query: str | None = None
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a browser's idle preconnect must not hold the one-at-a-time listener

            def do_GET(self) -> None:
                query = urlsplit(self.path).query
                state = parse_qs(query).get("state", [""])[0]
                if not listener.expected or state != listener.expected:
                    # Not our sign-in (CSRF, a stale tab): refuse it and keep waiting for the real one.
                    self._reply(400, "mailbackup: this sign-in answer does not match the one it started; ignored.")
                    return
                listener.query = query
                failed = "error" in parse_qs(query)
                self._reply(200, "mailbackup: sign-in failed; see the terminal." if failed
                            else "mailbackup: signed in. You can close this tab.")

            def _reply(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # the query holds the code: never log it
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.5
        self.port: int = self.server.server_address[1]

    def wait(self, state: str, timeout: float) -> str:
        self.expected = state
        deadline = time.monotonic() + timeout
        while self.query is None:
            if time.monotonic() > deadline:
                raise AuthError(f"no sign-in arrived within {timeout:.0f} s; run login again")
            self.server.handle_request()
        return self.query

    def close(self) -> None:
        self.server.server_close()
