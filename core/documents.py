"""Which DocumentReferences we process, and how their text is read. Pure functions, shared with the worker."""

from __future__ import annotations

import base64
import binascii
import html
import re
from dataclasses import dataclass
from typing import Any

PLAIN_TEXT = "text/plain"
MARKUP_TYPES = ("text/html", "application/xhtml+xml")
# In order of preference: plain text first, then markup (read with the tags blanked out, see below).
TEXT_CONTENT_TYPES = (PLAIN_TEXT, *MARKUP_TYPES)
DEFAULT_ACCEPTED_DOC_STATUS = frozenset({"final", "amended"})
RETRACTED_STATUS = "entered-in-error"


class AttachmentError(ValueError):
    """An attachment we should be able to read but cannot (bad base64, bad charset)."""


@dataclass(frozen=True)
class TextAttachment:
    index: int
    content_type: str
    charset: str
    data: str | None
    url: str | None
    language: str | None

    @property
    def is_markup(self) -> bool:
        return self.content_type in MARKUP_TYPES


def _media_type(content_type: str) -> tuple[str, str]:
    parts = [p.strip() for p in content_type.split(";")]
    charset = "utf-8"
    for part in parts[1:]:
        if part.lower().startswith("charset="):
            charset = part.split("=", 1)[1].strip().strip('"') or "utf-8"
    return parts[0].lower(), charset


def _attachments(document: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    found = []
    content = document.get("content")
    for index, item in enumerate(content if isinstance(content, list) else []):
        attachment = item.get("attachment") if isinstance(item, dict) else None
        if isinstance(attachment, dict):
            found.append((index, attachment))
    return found


def find_text_attachment(document: dict[str, Any]) -> TextAttachment | None:
    """The attachment we read as clinical text: the first ``text/plain`` one, else the first HTML/XHTML one."""
    best: TextAttachment | None = None
    for index, attachment in _attachments(document):
        content_type = attachment.get("contentType")
        media, charset = _media_type(content_type if isinstance(content_type, str) else "")
        data, url = attachment.get("data"), attachment.get("url")
        if media not in TEXT_CONTENT_TYPES or not (data or url):
            continue
        candidate = TextAttachment(
            index=index,
            content_type=media,
            charset=charset,
            data=data if isinstance(data, str) else None,
            url=url if isinstance(url, str) else None,
            language=attachment.get("language") if isinstance(attachment.get("language"), str) else None,
        )
        if media == PLAIN_TEXT:
            return candidate
        best = best or candidate
    return best


def is_retraction(document: dict[str, Any]) -> bool:
    """The note was entered in error: its earlier results must be retracted, not re-derived."""
    return RETRACTED_STATUS in (document.get("status"), document.get("docStatus"))


def skip_reason(document: dict[str, Any], accept_preliminary: bool = False) -> str | None:
    """Why this note is not processed, or None when it is. Retractions are handled before this is asked."""
    if document.get("status") != "current":
        return f"status is {_shown(document.get('status'))}, not 'current'"
    allowed = DEFAULT_ACCEPTED_DOC_STATUS | ({"preliminary"} if accept_preliminary else set())
    doc_status = document.get("docStatus")
    if doc_status is not None and doc_status not in allowed:
        return f"docStatus is {_shown(doc_status)}"
    if find_text_attachment(document) is None:
        types = sorted(
            {
                _shown(a.get("contentType"), quote=False) if a.get("contentType") else "none"
                for _, a in _attachments(document)
            }
        )
        return f"no text attachment (content types: {', '.join(types) or 'none'})"
    return None


def _shown(value: Any, quote: bool = True) -> str:
    """A code from the note's metadata, cut short: reasons are stored and returned, so keep them small."""
    text = str(value)[:64]
    return repr(text) if quote else text


def decode_attachment_data(attachment: TextAttachment) -> str:
    """Decode inline base64 data strictly: a corrupt attachment is an error, not an empty note."""
    if attachment.data is None:
        raise AttachmentError("attachment has no inline data")
    try:
        raw = base64.b64decode(attachment.data, validate=True)
    except (binascii.Error, ValueError):
        raise AttachmentError(f"content[{attachment.index}].attachment.data is not valid base64") from None
    return attachment_text(raw, attachment)


def attachment_text(raw: bytes, attachment: TextAttachment) -> str:
    """The text of an attachment's bytes (inline or fetched from its URL); markup is blanked out in place."""
    try:
        text = raw.decode(attachment.charset)
    except (UnicodeDecodeError, LookupError):
        raise AttachmentError(
            f"content[{attachment.index}].attachment is not valid {attachment.charset[:40]} text"
        ) from None
    return markup_to_text(text) if attachment.is_markup else text


_MARKUP = re.compile(
    r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<(script|style)\b[^>]*>.*?</\1\s*>|</?[A-Za-z][^>]*>|<![^>]*>|<\?.*?\?>",
    re.S | re.I,
)
_TAG_NAME = re.compile(r"</?(?:[A-Za-z][\w.-]*:)?([A-Za-z][\w.-]*)")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_BLOCK_TAGS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "footer"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section"),
        *("table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul"),
    }
)
_NOT_NEWLINE = re.compile(r"[^\n]")


def markup_to_text(markup: str) -> str:
    """HTML/XHTML as text of exactly the same length, so character offsets still point into the attachment.

    Tags, comments, scripts and styles become spaces (a block-level tag starts with a line break, so words
    on either side stay apart); an entity becomes its character followed by spaces. Line breaks are kept.
    """

    def blank(match: re.Match[str]) -> str:
        text = match.group(0)
        name = _TAG_NAME.match(text)
        spaced = _NOT_NEWLINE.sub(" ", text)
        if name and name.group(1).lower() in _BLOCK_TAGS and "\n" not in text:
            return "\n" + spaced[1:]
        return spaced

    def entity(match: re.Match[str]) -> str:
        text = match.group(0)
        try:
            value = html.unescape(text)
        except (ValueError, OverflowError):
            return text
        if value == text or len(value) > len(text):
            return text
        return value + " " * (len(text) - len(value))

    return _ENTITY.sub(entity, _MARKUP.sub(blank, markup))
