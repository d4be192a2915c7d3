"""SESSION_ENCRYPTION_KEY: Telegram sessions encrypted at rest.

A Telethon ``StringSession`` holds the account's auth key: whoever has it *is*
the account. It is stored only as a Fernet token (AES-128-CBC with an
HMAC-SHA256, from ``cryptography``) under SESSION_ENCRYPTION_KEY, and
decrypted in memory just before connecting. Several keys may be given,
comma-separated, newest first: the first encrypts, all decrypt, which is
what a key rotation needs (``python worker.py rotate-key``).

This module needs no Telethon, so the settings check and the commands that
only read or rotate keys start without it; :mod:`shared.sessions` (the
session object Telethon uses) re-exports these names.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.errors import PermanentError


#: What SessionCipher.decrypt says when no key opens a session. Older versions stored it as the
#: last_error of an account they marked needs_login; the database recognises it to undo that.
DECRYPT_FAILURE = "the session cannot be decrypted with SESSION_ENCRYPTION_KEY (wrong key?)"


class SessionKeyError(PermanentError):
    """The key is malformed, or does not open this session."""


def generate_key() -> str:
    """A new random key for SESSION_ENCRYPTION_KEY."""
    return Fernet.generate_key().decode("ascii")


def _fernet(key: str) -> Fernet:
    try:
        return Fernet(key.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise SessionKeyError(
            "SESSION_ENCRYPTION_KEY must be a Fernet key (32 url-safe base64-encoded bytes); "
            "make one with: ./start.sh sessions new-key"
        ) from exc


class SessionCipher:
    """Encrypts and decrypts session strings.

    Args:
        keys: one key, or several comma-separated (newest first).
    """

    def __init__(self, keys: str) -> None:
        parts = [k for k in (p.strip() for p in keys.split(",")) if k]
        if not parts:
            raise SessionKeyError("SESSION_ENCRYPTION_KEY is empty")
        self._fernets = [_fernet(k) for k in parts]
        self._multi = MultiFernet(self._fernets)

    def encrypt(self, session: str) -> str:
        return self._multi.encrypt(session.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """Raises SessionKeyError when no configured key opens ``token``."""
        try:
            return self._multi.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeEncodeError, UnicodeDecodeError):
            raise SessionKeyError(DECRYPT_FAILURE) from None

    def rotate(self, token: str) -> str:
        """Re-encrypt ``token`` under the newest key (it must open with one of the keys)."""
        try:
            return self._multi.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise SessionKeyError("the session cannot be decrypted with any configured key") from None

    def is_current(self, token: str) -> bool:
        """True when ``token`` is already encrypted under the newest key."""
        try:
            self._fernets[0].decrypt(token.encode("ascii"))
            return True
        except InvalidToken:
            return False
