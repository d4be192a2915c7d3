"""Hostile HTTP requests against a real StatusServer on 127.0.0.1, over raw sockets.

Every request gets a clear 4xx answer (never a 500, never the protected
status without the token, never a file from disk), and the server keeps
serving ``/health`` afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from shared.status_server import StatusServer

TOKEN = "s3cret-status-token"
SECRET_IN_STATUS = "the-status-body-marker"


@pytest.fixture
async def server() -> AsyncIterator[StatusServer]:
    srv = StatusServer(
        bot="hostile",
        version="test",
        port=0,
        host="127.0.0.1",
        token=TOKEN,
        status=lambda: {"marker": SECRET_IN_STATUS},
        provider_timeout=2.0,
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@dataclass
class Reply:
    status: int | None
    head: str
    body: str


async def raw(server: StatusServer, payload: bytes, *, timeout: float = 10.0) -> Reply:
    """Send bytes as they are and read the whole answer (the server closes or answers)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), timeout)
    try:
        writer.write(payload)
        await writer.drain()
        data = b""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
                    if b"\r\n\r\n" in data and _complete(data):
                        break
        except TimeoutError:
            pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
    text = data.decode("latin-1")
    head, _, body = text.partition("\r\n\r\n")
    status = None
    if head.startswith("HTTP/"):
        parts = head.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return Reply(status, head, body)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1].strip() or 0)
    return False


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def assert_still_serving(server: StatusServer) -> None:
    reply = await raw(server, get("/health"))
    assert reply.status == 200, reply.head


# --- oversized and malformed requests -------------------------------------------------------

MALFORMED: list[tuple[str, bytes, set[int]]] = [
    ("a 20 KB header value", get("/health", "X-Big: " + "a" * 20_000), {400, 431}),
    ("200 headers", get("/health", *[f"X-H{n}: v" for n in range(200)]), {400, 431}),
    ("a 20 KB request line", get("/health?q=" + "a" * 20_000), {400, 414}),
    ("a 1 MB header block", get("/health", *[f"X-H{n}: " + "b" * 5000 for n in range(200)]), {400, 431}),
    ("binary garbage", b"\x00\x01\x02\xff\xfe GARBAGE \r\n\r\n", {400}),
    ("an HTTP/0.9 request for the protected status", b"GET /status\r\n\r\n", {400, 401}),
    ("an unknown HTTP version", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505}),
    ("a NUL in a header value", get("/health", "X-Nul: a\x00b"), {400}),
    ("a header without a colon", get("/health", "NoColonHere"), {400}),
    ("a negative content length", get("/health", "Content-Length: -1"), {400}),
    ("conflicting content lengths", get("/health", "Content-Length: 1", "Content-Length: 2"), {400}),
    ("a POST body over the limit", b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n" + b"x" * 70_000, {401, 405, 413}),
]


@pytest.mark.parametrize(("case", "payload", "allowed"), MALFORMED, ids=[c[0] for c in MALFORMED])
async def test_malformed_or_oversized_request_gets_a_4xx_and_the_server_keeps_serving(
    server: StatusServer, case: str, payload: bytes, allowed: set[int]
) -> None:
    reply = await raw(server, payload)
    assert reply.status in allowed | {None}, f"{case}: {reply.head[:300]}"
    assert reply.status != 500
    assert SECRET_IN_STATUS not in reply.body
    await assert_still_serving(server)


# --- tokens ---------------------------------------------------------------------------------

BAD_TOKENS: list[Any] = [
    ("no token", get("/status")),
    ("an empty bearer", get("/status", "Authorization: Bearer ")),
    ("a wrong bearer", get("/status", "Authorization: Bearer wrong")),
    ("the token as Basic auth", get("/status", f"Authorization: Basic {TOKEN}")),
    ("a token prefix", get("/status", f"Authorization: Bearer {TOKEN[:-1]}")),
    ("the token with a suffix", get("/status", f"Authorization: Bearer {TOKEN}x")),
    ("an 8 KB bearer", get("/status", "Authorization: Bearer " + "t" * 8000)),
    (
        "latin-1 bytes in the bearer",
        "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xe9\xff\r\n\r\n".encode("latin-1"),
    ),
    ("raw UTF-8 in the bearer", b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xf0\x9f\x94\x91\r\n\r\n"),
    ("a wrong query token", get("/status?token=wrong")),
    ("an empty query token", get("/status?token=")),
    ("a percent-encoded NUL token", get("/status?token=%00")),
    ("invalid UTF-8 in the query token", get("/status?token=%ff%fe")),
    ("the token twice, second one right", get(f"/status?token=wrong&token={TOKEN}")),
    ("the token in another parameter", get(f"/status?tok={TOKEN}")),
    ("the token on /metrics wrong", get("/metrics", "Authorization: Bearer nope")),
    ("the page with a wrong token", get("/?token=nope")),
]


@pytest.mark.parametrize(("case", "payload"), BAD_TOKENS, ids=[c[0] if isinstance(c, tuple) else c.id for c in BAD_TOKENS])
async def test_a_bad_token_is_refused_without_revealing_the_status(server: StatusServer, case: str, payload: bytes) -> None:
    reply = await raw(server, payload)
    assert reply.status in (400, 401), f"{case}: {reply.head[:300]}"
    assert SECRET_IN_STATUS not in reply.body
    assert TOKEN not in reply.body
    await assert_still_serving(server)


async def test_the_right_token_still_opens_the_status(server: StatusServer) -> None:
    reply = await raw(server, get("/status", f"Authorization: Bearer {TOKEN}"))
    assert reply.status == 200 and SECRET_IN_STATUS in reply.body


# --- path traversal and path tricks -----------------------------------------------------------

PATHS = [
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/..%2f..%2f..%2fetc%2fpasswd",
    "/health/../../etc/passwd",
    "/health/..%2fstatus",
    "/health/../status",
    "/./status",
    "//status",
    "/status/",
    "/STATUS",
    "/status%00",
    "/status;token=x",
    "/metrics/../status",
    "/%2fstatus",
    "/static/../../../../etc/shadow",
    "/\\..\\..\\etc\\passwd",
]


@pytest.mark.parametrize("path", PATHS)
async def test_path_tricks_neither_read_files_nor_skip_the_token(server: StatusServer, path: str) -> None:
    reply = await raw(server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
    assert reply.status in (400, 401, 404, 405), f"{path}: {reply.head[:300]}"
    assert "root:" not in reply.body
    assert SECRET_IN_STATUS not in reply.body
    await assert_still_serving(server)


# --- slow and idle clients --------------------------------------------------------------------


async def test_slow_clients_dribbling_headers_do_not_block_others(server: StatusServer) -> None:
    """50 clients send half a request and stall; /health still answers, and they are answered or cut later."""
    slow: list[asyncio.StreamWriter] = []
    try:
        for _ in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            await writer.drain()
            slow.append(writer)
        for _ in range(3):
            await assert_still_serving(server)
        for writer in slow[:10]:
            writer.write(b"a")  # one more byte each, still no end of headers
            await writer.drain()
        await assert_still_serving(server)
    finally:
        for writer in slow:
            writer.close()
    await assert_still_serving(server)


async def test_a_client_that_never_reads_its_answer_does_not_block_others(server: StatusServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        # Pipelined requests whose answers are never read: the server's send buffer fills up.
        writer.write(get("/health").replace(b"Connection: close", b"Connection: keep-alive") * 200)
        await writer.drain()
        await assert_still_serving(server)
    finally:
        writer.close()
    await assert_still_serving(server)
