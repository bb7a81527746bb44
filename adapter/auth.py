"""Who may notify us: bearer tokens (several, for rotation) and Medplum's X-Signature HMAC, in constant time."""

from __future__ import annotations

import hashlib
import hmac


def bearer_matches(authorization: str | None, tokens: list[str]) -> bool:
    """``Authorization: Bearer <token>`` with one of ``tokens``; every token is compared, so timing says nothing."""
    if not tokens or not authorization or authorization[:7].lower() != "bearer ":
        return False
    presented = authorization[7:].strip().encode()
    matches = [hmac.compare_digest(presented, token.encode()) for token in tokens]
    return any(matches)


def signature_matches(signature: str | None, body: bytes, secrets: list[bytes]) -> bool:
    """``X-Signature``: the hex HMAC-SHA256 of the raw body with one of the shared ``secrets``."""
    if not signature or not secrets:
        return False
    presented = signature.strip().lower()
    if presented.startswith("sha256="):
        presented = presented[7:]
    presented_bytes = presented.encode("ascii", "replace")
    matches = [
        hmac.compare_digest(presented_bytes, hmac.new(secret, body, hashlib.sha256).hexdigest().encode())
        for secret in secrets
    ]
    return any(matches)
