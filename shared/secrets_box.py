"""Encryption at rest for image secrets, and the shapes of tokens and invite codes.

Image secrets are sealed with AES-256-GCM under PAYMENTS_SECRET_KEY (base64 of 32 random bytes).
Each sealed value starts with the key's id (the first 8 bytes of the key's sha256), then a
96-bit random nonce, then the ciphertext and tag; the image reference is the associated data,
so a sealed secret moved to another image's row does not open. `payments secrets rotate`
re-seals every secret under the current key while PAYMENTS_SECRET_KEY_PREVIOUS still opens
the old ones.

Tokens and invite codes are never stored: only `sha256:<hex>` of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets as random_source

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TOKEN_BYTES = 32
INVITE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
INVITE_CODE_CHARS = 20
INVITE_GROUP_CHARS = 4


class SecretKeyError(ValueError):
    """The configured key is missing or malformed, or no configured key opens a value."""


def parse_key(value: str | None) -> bytes | None:
    if value is None or not value.strip():
        return None
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SecretKeyError("the secret key must be base64") from None
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"the secret key must decode to {KEY_BYTES} bytes")
    return key


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


class SecretBox:
    def __init__(self, current: bytes, previous: bytes | None = None) -> None:
        self.current = current
        self.keys = {key_id(current): current}
        if previous is not None:
            self.keys[key_id(previous)] = previous

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.current).encrypt(nonce, plaintext, context.encode("utf-8"))
        return key_id(self.current) + nonce + sealed

    def open(self, sealed: bytes, context: str) -> bytes:
        key = self.keys.get(sealed[:KEY_ID_BYTES])
        if key is None:
            raise SecretKeyError("no configured key opens this secret (rotated away?)")
        nonce = sealed[KEY_ID_BYTES : KEY_ID_BYTES + NONCE_BYTES]
        try:
            return AESGCM(key).decrypt(
                nonce, sealed[KEY_ID_BYTES + NONCE_BYTES :], context.encode("utf-8")
            )
        except Exception:
            raise SecretKeyError("the secret does not open under its key") from None

    def sealed_with_current(self, sealed: bytes) -> bool:
        return sealed[:KEY_ID_BYTES] == key_id(self.current)


def digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def new_token() -> str:
    return random_source.token_urlsafe(TOKEN_BYTES)


def normalize_invite(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch.isalnum())


def new_invite_code() -> str:
    raw = "".join(random_source.choice(INVITE_ALPHABET) for _ in range(INVITE_CODE_CHARS))
    groups = [
        raw[i : i + INVITE_GROUP_CHARS] for i in range(0, INVITE_CODE_CHARS, INVITE_GROUP_CHARS)
    ]
    return "-".join(groups)


def hashes_equal(left: str, right: str) -> bool:
    return hmac.compare_digest(left.encode("utf-8"), right.encode("utf-8"))
