"""Rows from either backend map to the same records."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from shared.db import OutboundMessage, OutboundStatus
from shared.db.records import from_row, parse_datetime

WHEN = datetime(2026, 11, 24, 3, 38, 28, 417008, tzinfo=timezone.utc)
TOKEN = uuid.UUID("2ef2082e-64b2-4e2e-acfb-965e3cc56a71")

NATIVE = {  # as asyncpg returns it
    "id": 1, "account_id": 2, "peer": "alice", "chat_id": None, "text": "hi", "attachments": ["k/1.jpg"],
    "reply_to": None, "status": "sending", "attempts": 1, "next_attempt_at": WHEN, "random_id": -9223372036854775807,
    "dedupe_key": None, "lease_owner": "w", "lease_token": TOKEN, "lease_expires_at": WHEN, "last_error": None,
    "telegram_message_id": None, "created_at": WHEN, "updated_at": WHEN, "sent_at": None, "direction": "outbound",
}
JSON = {  # as PostgREST returns it
    **NATIVE,
    "next_attempt_at": "2026-11-24T03:38:28.417008+00:00",
    "lease_token": str(TOKEN),
    "lease_expires_at": "2026-11-24T04:38:28.417008+01:00",
    "created_at": "2026-11-24T03:38:28.417008Z",
    "updated_at": "2026-11-24 03:38:28.417008+00",
}


def test_native_and_json_rows_give_identical_records() -> None:
    native = from_row(OutboundMessage, NATIVE)
    assert from_row(OutboundMessage, JSON) == native
    assert native.status is OutboundStatus.SENDING and native.lease_token == str(TOKEN)
    assert native.attachments == ("k/1.jpg",) and native.random_id == -9223372036854775807


def test_timestamps_are_aware_utc() -> None:
    assert parse_datetime("2026-01-01T00:00:00") == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_datetime(None) is None
