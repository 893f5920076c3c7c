"""HTML mail made safe to show: sanitised with nh3 (ammonia), remote images held back until asked for."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import nh3

INLINE_CAP = 2 << 20  # bytes of one cid: image put inline as a data: URL
REMOTE_SCHEMES = ("http:", "https:", "//")


@dataclass(frozen=True)
class SafeHtml:
    html: str
    blocked: int  # remote images held back


def sanitise(html: str, *, remote: bool, images: dict[str, tuple[str, bytes]]) -> SafeHtml:
    """nh3's defaults (no script, style, event handler or unknown tag) with images limited to
    data: and the message's own cid: parts, plus http(s) only when remote is True."""
    blocked = 0

    def keep(tag: str, attribute: str, value: str) -> str | None:
        nonlocal blocked
        if tag != "img" or attribute != "src":
            if attribute in ("href", "src") and value.strip().lower().startswith(("data:", "cid:")):
                return None  # data: and cid: only ever as an image
            return value
        lowered = value.strip().lower()
        if lowered.startswith("cid:"):
            found = images.get(value.strip()[4:].strip("<>"))
            if found is None or len(found[1]) > INLINE_CAP or not found[0].startswith("image/"):
                return None
            return f"data:{found[0]};base64,{base64.b64encode(found[1]).decode('ascii')}"
        if lowered.startswith("data:image/") and not lowered.startswith("data:image/svg"):
            return value
        if lowered.startswith(REMOTE_SCHEMES):
            if remote:
                return value
            blocked += 1
        return None

    cleaned = nh3.clean(
        html,
        url_schemes={"http", "https", "mailto", "data", "cid"},
        attribute_filter=keep,
        link_rel="noopener noreferrer",
        strip_comments=True,
    )
    return SafeHtml(cleaned, blocked)


def frame_policy(remote: bool) -> str:
    """The Content-Security-Policy of the page that holds a message's HTML (inside a sandboxed iframe)."""
    images = "data: http: https:" if remote else "data:"
    return (
        f"default-src 'none'; img-src {images}; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'self'; sandbox allow-popups allow-popups-to-escape-sandbox"
    )
