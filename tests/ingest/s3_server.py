"""moto's S3 server on 127.0.0.1 standing in for Cloudflare R2 (real HTTP, real boto3).

Import the fixtures into a test module (``from tests.ingest.s3_server import s3_server, s3_bucket``)
or register this module as a plugin:

* ``s3_server`` (session): one ``ThreadedMotoServer`` for the whole run.
* ``s3_bucket`` (function): a fresh bucket on it.
* ``s3_outage`` (function): a server of the test's own that it may stop (connections
  refused, as when R2 is unreachable) and start again on the same port, data kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from bench._common import S3Server as _S3Server

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "us-east-1"

logging.getLogger("werkzeug").setLevel(logging.WARNING)


class S3Server(_S3Server):
    """``bench._common.S3Server`` with the tests' credentials (:data:`ACCESS_KEY`, :data:`SECRET_KEY`)."""

    def __init__(self) -> None:
        super().__init__(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def s3_outage() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()
