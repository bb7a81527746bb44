"""Which DocumentReferences we process, and how their text is read. Pure functions, shared with the worker."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

TEXT_CONTENT_TYPES = ("text/plain",)


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


def _media_type(content_type: str) -> tuple[str, str]:
    parts = [p.strip() for p in content_type.split(";")]
    charset = "utf-8"
    for part in parts[1:]:
        if part.lower().startswith("charset="):
            charset = part.split("=", 1)[1].strip().strip('"') or "utf-8"
    return parts[0].lower(), charset


def find_text_attachment(document: dict[str, Any]) -> TextAttachment | None:
    """The first attachment whose content type we can read as clinical text."""
    for index, content in enumerate(document.get("content") or []):
        attachment = content.get("attachment") or {}
        media, charset = _media_type(attachment.get("contentType") or "")
        if media in TEXT_CONTENT_TYPES and (attachment.get("data") or attachment.get("url")):
            return TextAttachment(
                index=index,
                content_type=media,
                charset=charset,
                data=attachment.get("data"),
                url=attachment.get("url"),
                language=attachment.get("language"),
            )
    return None


def skip_reason(document: dict[str, Any], accept_preliminary: bool = False) -> str | None:
    """Why this note is not processed, or None when it is."""
    if document.get("status") != "current":
        return f"status is {document.get('status')!r}, not 'current'"
    allowed = {"final", "amended"} | ({"preliminary"} if accept_preliminary else set())
    doc_status = document.get("docStatus")
    if doc_status is not None and doc_status not in allowed:
        return f"docStatus is {doc_status!r}"
    if find_text_attachment(document) is None:
        types = sorted(
            {(c.get("attachment") or {}).get("contentType") or "none" for c in document.get("content") or []}
        )
        return f"no text attachment (content types: {', '.join(types) or 'none'})"
    return None


def decode_attachment_data(attachment: TextAttachment) -> str:
    """Decode inline base64 data strictly: a corrupt attachment is an error, not an empty note."""
    if attachment.data is None:
        raise AttachmentError("attachment has no inline data")
    try:
        raw = base64.b64decode(attachment.data, validate=True)
    except (binascii.Error, ValueError):
        raise AttachmentError(f"content[{attachment.index}].attachment.data is not valid base64") from None
    try:
        return raw.decode(attachment.charset)
    except (UnicodeDecodeError, LookupError):
        raise AttachmentError(
            f"content[{attachment.index}].attachment.data is not valid {attachment.charset} text"
        ) from None
