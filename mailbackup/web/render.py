"""HTML mail made safe to show: sanitised with nh3 (ammonia), remote images held back until asked for."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import nh3

# Presentation only: no property here takes a URL (background-image, list-style-image, content,
# cursor...), and nothing positions content over the page around the frame.
STYLE_PROPERTIES = frozenset({
    "color", "background-color", "font", "font-family", "font-size", "font-style", "font-weight",
    "line-height", "letter-spacing", "text-align", "text-decoration", "text-transform", "vertical-align",
    "white-space", "margin", "margin-top", "margin-right", "margin-bottom", "margin-left", "padding",
    "padding-top", "padding-right", "padding-bottom", "padding-left", "border", "border-top", "border-right",
    "border-bottom", "border-left", "border-color", "border-style", "border-width", "border-collapse",
    "border-spacing", "border-radius", "width", "max-width", "min-width", "height", "max-height", "min-height",
    "display",
})
# Old-style table layout that most HTML mail still uses.
LAYOUT_ATTRIBUTES = {"table": {"width", "border", "cellpadding", "cellspacing", "bgcolor"},
                     "td": {"width", "height", "valign", "bgcolor"}, "th": {"width", "valign", "bgcolor"},
                     "tr": {"valign", "bgcolor"}, "font": {"color", "size", "face"}}
ATTRIBUTES = {tag: set(names) for tag, names in nh3.ALLOWED_ATTRIBUTES.items()}
for _tag, _names in LAYOUT_ATTRIBUTES.items():
    ATTRIBUTES.setdefault(_tag, set()).update(_names)
ATTRIBUTES.setdefault("*", set()).add("style")
TAGS = set(nh3.ALLOWED_TAGS) | {"font"}
INLINE_CAP = 2 << 20  # bytes of one cid: image put inline as a data: URL
REMOTE_SCHEMES = ("http:", "https:", "//")


@dataclass(frozen=True)
class SafeHtml:
    html: str
    blocked: int  # remote images held back


def sanitise(html: str, *, remote: bool, images: dict[str, tuple[str, bytes]]) -> SafeHtml:
    """nh3's defaults (no script, <style>, event handler or unknown tag) plus inline styles cut to
    STYLE_PROPERTIES; images limited to data: and the message's own cid: parts, plus http(s) only
    when remote is True."""
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
        tags=TAGS,
        attributes=ATTRIBUTES,
        filter_style_properties=set(STYLE_PROPERTIES),
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
