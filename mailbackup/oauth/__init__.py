"""Built-in OAuth2 sign-in: `mailbackup login` once, then a fresh access token for every run.

settings.py reads an account's `oauth2 = {...}` table, store.py keeps the refresh token
(keyring or a 0600 file), flows.py signs in and refreshes through authlib.
"""

from .flows import access_token, login
from .settings import OAuth2Settings, parse
from .store import TokenStore

__all__ = ["OAuth2Settings", "TokenStore", "access_token", "login", "parse"]
