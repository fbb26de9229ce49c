"""A real S3 API for the object-storage tests: moto's standalone server in a subprocess, never an in-process mock.

The requests go over HTTP through s3fs / aiobotocore exactly as they would to AWS; only the endpoint differs
(``AWS_ENDPOINT_URL_S3``). Needs the dev extra's ``moto[s3]``, ``flask``, ``flask-cors`` and ``s3fs``; without
them the tests that use these fixtures are skipped, saying so.

Fixtures:
  s3_server      session   one server for the whole run (state wiped per test by ``s3_bucket``)
  s3_env         function  the environment a CLI user sets (keys, region, endpoint), failing fast: one attempt
                           per request, no retry storm, so a fault test takes a second, not a minute
  s3_bucket      function  a fresh bucket on a wiped server
  s3_auth        function  credentials enforced from the next request on (an IAM user with s3:*): the default
                           keys of ``s3_env`` are then refused
  private_s3     function  a server of the test's own, which it may kill (the server going away)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import IO

import pytest

KEY, SECRET, REGION = "testing", "testing", "us-east-1"


@dataclasses.dataclass
class S3Server:
    """A running moto server: its endpoint and process."""

    endpoint: str
    proc: subprocess.Popen
    log: IO[bytes] | None = None  # werkzeug's log of every request (the server's stderr)

    def post(self, path: str, body: bytes = b"") -> bytes:
        """POST to moto's control API (a text body: with a form type Flask eats it)."""
        request = urllib.request.Request(
            self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read()

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a new name by default) with boto3: s3fs's mkdir sends a location moto refuses."""
        import boto3

        name = name or f"hm-{uuid.uuid4().hex[:12]}"
        client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
        )
        client.create_bucket(Bucket=name)
        return name

    def gets(self, prefix: str) -> list[str]:
        """The paths of the GET requests logged so far whose path starts with ``prefix`` (``/bucket/key...``),
        one entry per request: what the clients downloaded, seen from the server (werkzeug may colour the line).
        Read with ``pread``: the server writes through the same file offset."""
        assert self.log is not None
        text = os.pread(self.log.fileno(), os.fstat(self.log.fileno()).st_size, 0).decode(errors="replace")
        return [path for path in re.findall(r'"(?:\x1b\[[\d;]*m)*GET (\S+) HTTP', text) if path.startswith(prefix)]

    def kill(self) -> None:
        """Stop at once, as a crashed or unreachable server would (SIGKILL: no goodbye on open connections)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(timeout: float = 30.0) -> S3Server:
    """Start ``moto_server`` on a free port and wait until it answers."""
    pytest.importorskip("moto", reason="the object-storage tests need moto[s3], flask and flask-cors (dev extra)")
    pytest.importorskip("flask_cors", reason="moto's standalone server needs flask-cors (dev extra)")
    pytest.importorskip("s3fs", reason="--cache s3:// needs s3fs ('hookmix[cloud]')")
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION}
    log = tempfile.TemporaryFile()  # not a pipe: werkzeug logs every request, and a full pipe hangs the server
    proc = subprocess.Popen(
        [*([exe] if exe else [sys.executable, "-m", "moto.server"]), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
        start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto_server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(server.endpoint + "/moto-api/data.json", timeout=1):
                return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"moto_server did not answer on {server.endpoint} within {timeout} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = _start()
    try:
        yield server
    finally:
        server.stop()


def point_at(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """Configure S3 through the environment only, as ``hookmix finetune --cache s3://...`` is configured: keys,
    region, endpoint (botocore >= 1.31 reads ``AWS_ENDPOINT_URL_S3``), ~/.aws ignored; one attempt per request
    (``AWS_MAX_ATTEMPTS``) and one try of s3fs's own retry loop (a class attribute: no setting reaches it)."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()  # a client made for another endpoint or keys is not reused


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    point_at(monkeypatch, s3_server)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    s3_env.post("/moto-api/reset")
    return s3_env.bucket()


@pytest.fixture
def s3_auth(s3_env: S3Server, s3_bucket: str) -> Iterator[Callable[[], None]]:
    """A function that makes the server refuse the environment's keys from the next request on."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=s3_env.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    iam.create_user(UserName="hookmix")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="hookmix", PolicyName="s3", PolicyDocument=json.dumps(policy))
    try:
        yield lambda: s3_env.post("/moto-api/reset-auth", b"0")
    finally:
        s3_env.post("/moto-api/reset-auth", b"inf")


@pytest.fixture
def private_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A server of this test's own, the environment pointing at it, with one bucket ``hookmix``."""
    server = _start()
    try:
        point_at(monkeypatch, server)
        server.bucket("hookmix")
        yield server
    finally:
        server.stop()
