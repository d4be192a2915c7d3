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
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "us-east-1"

logging.getLogger("werkzeug").setLevel(logging.WARNING)


class S3Server:
    """A moto S3 server that can be stopped and started again on its port (its data lives in the process)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadedMotoServer | None = None

    def start(self) -> S3Server:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connections are refused."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        inner = getattr(server, "_server", None)
        if inner is not None:
            inner.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )

    def create_bucket(self) -> str:
        name = f"ingest-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str) -> dict[str, str]:
        """The R2_* settings pointing at this server."""
        return {
            "R2_ENDPOINT": self.url,
            "R2_BUCKET": bucket,
            "R2_ACCESS_KEY_ID": ACCESS_KEY,
            "R2_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def keys(self, bucket: str, prefix: str = "") -> set[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}


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
