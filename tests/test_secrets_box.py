"""Sealing image secrets at rest, and the stored shapes of tokens and invite codes."""

from __future__ import annotations

import base64
import hashlib
import os
import re

import pytest

from shared.secrets_box import (
    INVITE_ALPHABET,
    SecretBox,
    SecretKeyError,
    digest,
    hashes_equal,
    key_id,
    new_invite_code,
    new_token,
    normalize_invite,
    parse_key,
)
from shared.settings import ConfigurationError, build_settings

KEY_A, KEY_B = os.urandom(32), os.urandom(32)
SECRET = b"AGE-SECRET-KEY-1" + os.urandom(48)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_a_sealed_secret_opens_under_its_key_and_holds_no_plaintext() -> None:
    box = SecretBox(KEY_A)
    sealed = box.seal(SECRET, "ghcr.io/example/image:v1")
    assert box.open(sealed, "ghcr.io/example/image:v1") == SECRET
    assert sealed[:8] == key_id(KEY_A)
    for form in (SECRET, SECRET.hex().encode(), b64(SECRET).encode(), SECRET[:16]):
        assert form not in sealed
    # A fresh nonce each time: sealing twice never gives the same bytes.
    assert box.seal(SECRET, "ghcr.io/example/image:v1") != sealed


def test_a_sealed_secret_is_bound_to_its_image() -> None:
    box = SecretBox(KEY_A)
    sealed = box.seal(SECRET, "image-a")
    with pytest.raises(SecretKeyError):
        box.open(sealed, "image-b")


def test_tampering_is_detected() -> None:
    box = SecretBox(KEY_A)
    sealed = bytearray(box.seal(SECRET, "image"))
    sealed[-1] ^= 1
    with pytest.raises(SecretKeyError):
        box.open(bytes(sealed), "image")


def test_the_previous_key_opens_old_secrets_and_the_current_key_seals() -> None:
    old = SecretBox(KEY_A).seal(SECRET, "image")
    rotating = SecretBox(KEY_B, previous=KEY_A)
    assert rotating.open(old, "image") == SECRET
    assert not rotating.sealed_with_current(old)
    resealed = rotating.seal(SECRET, "image")
    assert rotating.sealed_with_current(resealed)
    assert SecretBox(KEY_B).open(resealed, "image") == SECRET
    with pytest.raises(SecretKeyError, match="no configured key"):
        SecretBox(KEY_A).open(resealed, "image")
    with pytest.raises(SecretKeyError, match="no configured key"):
        SecretBox(KEY_B).open(old, "image")


def test_errors_never_carry_the_secret_or_the_key() -> None:
    box = SecretBox(KEY_A)
    sealed = box.seal(SECRET, "image")
    for opener, context in ((SecretBox(KEY_B), "image"), (box, "another image")):
        with pytest.raises(SecretKeyError) as error:
            opener.open(sealed, context)
        text = str(error.value) + repr(error.value)
        for form in (b64(SECRET), SECRET.hex(), b64(KEY_A), KEY_A.hex()):
            assert form not in text


def test_parse_key_wants_base64_of_32_bytes() -> None:
    assert parse_key(None) is None
    assert parse_key("  ") is None
    assert parse_key(b64(KEY_A)) == KEY_A
    with pytest.raises(SecretKeyError, match="base64"):
        parse_key("not base64 at all!")
    with pytest.raises(SecretKeyError, match="32 bytes"):
        parse_key(b64(os.urandom(16)))


def test_a_malformed_key_stops_start_up_with_one_line_naming_the_variable() -> None:
    bad = b64(os.urandom(16))
    with pytest.raises(ConfigurationError) as error:
        build_settings(secret_key=bad)
    message = str(error.value)
    assert "PAYMENTS_SECRET_KEY" in message and "\n" not in message
    assert bad not in message
    with pytest.raises(ConfigurationError, match="PAYMENTS_SECRET_KEY_PREVIOUS"):
        build_settings(secret_key=b64(KEY_A), secret_key_previous="nope!")


def test_tokens_and_invite_codes_are_stored_as_sha256() -> None:
    token = new_token()
    assert len(token) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert digest(token) == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert token not in digest(token)
    assert hashes_equal(digest(token), digest(token))
    assert not hashes_equal(digest(token), digest(new_token()))


def test_invite_codes_look_like_the_originals_and_normalize_case_and_dashes() -> None:
    code = new_invite_code()
    assert re.fullmatch(r"[A-Z2-9]{4}(-[A-Z2-9]{4}){4}", code)
    raw = code.replace("-", "")
    assert set(raw) <= set(INVITE_ALPHABET)
    assert normalize_invite(code) == raw
    assert normalize_invite(" " + code.lower().replace("-", " ") + " ") == raw
    assert len({new_invite_code() for _ in range(200)}) == 200
