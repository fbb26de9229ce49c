"""The two stores of a feature cache (hookmix.headonly.store), checked from the outside: the bytes on disk or in
the bucket (moto's S3 server in a subprocess, see conftest.py) and each error's one line, word for word.

The cache's own tests (test_cache.py, test_object_store.py) go through ``FeatureCache`` and match a word of each
message; ``make mutate`` showed that a store passing ``None`` for the fix or the manifest's name, a size check on
the streamed copy that names nothing, and the failure of any request but a shard's write went unnoticed.

Bugs these tests catch, and where:

* a shard's message without its fix or the manifest that lists it, or naming another object, locally or in S3,
  mapped (``fetch``) or read (``open``) -> ``test_a_damaged_shard_is_refused_in_one_line_naming_it_and_the_fix``;
  the same test catches a comparison of the sha256 turned around, and a fetch that returns other bytes;
* an object cut short after its size was read (another writer, a lifecycle rule) used, or refused without saying
  which object and how many bytes arrived -> ``test_an_object_cut_short_while_it_is_streamed_is_refused_naming_it``
  (in S3 s3fs's own ETag check refuses it first; through fsspec's ``local://`` only the byte count does);
* a refused request other than a shard's write (the progress record, the publication of the manifest, the removal
  of the progress record, the read-back of a shard already there) raised as a botocore traceback, or as a line
  that names another request or object -> ``test_each_refused_request_is_one_line_naming_it_and_the_object``
  (the store refuses one action on one object through an IAM policy: the other requests go through);
* the removal of a progress record that is not there taken for a failure (a backend whose delete raises
  ``FileNotFoundError``: fsspec's ``local://``) -> ``test_a_manifest_is_published_where_no_progress_record_exists``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hookmix.core.errors import UsageError
from hookmix.headonly.store import RemoteStore, StoreError, open_store
from tests.headonly.conftest import KEY, REGION, SECRET, S3Server

FIX, LISTED_IN = "do the fix", "index.json"
DATA = bytes(range(256)) * 64  # 16 KiB, its last byte 255
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """A cache location: a local directory, or a prefix in a fresh bucket."""
    if request.param == "local":
        return tmp_path / "cache"
    return f"s3://{request.getfixturevalue('s3_bucket')}/cache"


def replace(location: str | Path, name: str, data: bytes | None) -> None:
    """Put ``data`` in place of object ``name`` (remove it when ``None``), bypassing the store: damage."""
    store = open_store(location)
    if isinstance(store, RemoteStore):
        key = f"{store._root}/{name}"
        store.fs.rm_file(key)
        if data is not None:
            store.fs.pipe_file(key, data)
    elif data is None:
        (Path(location) / name).unlink()
    else:
        (Path(location) / name).write_bytes(data)


DAMAGE = {"missing": None, "truncated": DATA[:1000], "changed": DATA[:-1] + b"\x00"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_is_refused_in_one_line_naming_it_and_the_fix(location: str | Path, damage: str) -> None:
    store = open_store(location)
    store.prepare()
    store.write("shard", DATA)
    assert bytes(store.fetch("shard", len(DATA), DIGEST, FIX, LISTED_IN)) == DATA
    replace(location, "shard", DAMAGE[damage])
    where = f"{location}/shard"
    expected = {
        "missing": f"shard {where} listed in index.json is missing; do the fix.",
        "truncated": f"shard {where} is 1000 bytes but index.json says 16384 (truncated?); do the fix.",
        "changed": f"shard {where} fails its checksum (sha256 {hashlib.sha256(DAMAGE['changed']).hexdigest()[:12]}..., "
        f"index.json says {DIGEST[:12]}...): its bytes changed after it was written; do the fix.",
    }[damage]
    reads: list[Callable[[], object]] = [lambda: store.fetch("shard", len(DATA), DIGEST, FIX, LISTED_IN)]
    if damage != "changed":  # open checks the size only; its reader hashes the rows it reads
        reads.append(lambda: store.open("shard", len(DATA), FIX, LISTED_IN).__enter__())
    for read in reads:
        with pytest.raises(UsageError) as info:
            read()
        assert str(info.value) == expected and not isinstance(info.value, StoreError)  # damage, not a failed request


@pytest.mark.parametrize("backend", ["s3", "fsspec-local"])
def test_an_object_cut_short_while_it_is_streamed_is_refused_naming_it(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object is cut short after its size was read: s3fs's reads find another ETag (a failed request); a
    backend without such a check (fsspec's ``local://``) delivers fewer bytes, which the count refuses."""
    if backend == "s3":
        url = f"s3://{request.getfixturevalue('s3_bucket')}/cache"
    else:
        url = f"local://{tmp_path}/cache"
        (tmp_path / "cache").mkdir()
    store = open_store(url)
    assert isinstance(store, RemoteStore)
    cut = store.fs.pipe_file if backend == "s3" else lambda path, data: Path(path).write_bytes(data)  # in place
    store.write("shard", DATA)
    opened = store.fs.open

    def open_then_cut(path: str, *args, **kwargs):
        file = opened(path, *args, **kwargs)  # its size is read now: 16384 bytes
        cut(path, DATA[:1000])  # then another process cuts the object short
        return file

    monkeypatch.setattr(store.fs, "open", open_then_cut)
    with pytest.raises(UsageError) as info:
        store.fetch("shard", len(DATA), DIGEST, FIX, LISTED_IN)
    message = str(info.value)
    if backend == "s3":
        assert isinstance(info.value, StoreError) and "\n" not in message, message
        assert message.startswith(f"reading {url}/shard failed: FileExpired: "), message
        assert message.endswith(
            "another program writes under this prefix; let it finish, or give the cache a prefix of its own."
        ), message
    else:
        assert message == f"shard {url}/shard is 1000 bytes but index.json says 16384 (truncated?); do the fix."


def refuse(server: S3Server, monkeypatch: pytest.MonkeyPatch, action: str, resource: str) -> None:
    """From the next request on, the environment's keys are those of a user allowed everything on S3 but
    ``action`` on ``resource``."""
    import boto3
    import s3fs

    iam = boto3.client(
        "iam", endpoint_url=server.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    iam.create_user(UserName="hookmix")
    statements = [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": action, "Resource": f"arn:aws:s3:::{resource}"},
    ]
    iam.put_user_policy(
        UserName="hookmix",
        PolicyName="s3",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
    )
    keys = iam.create_access_key(UserName="hookmix")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["SecretAccessKey"])
    s3fs.S3FileSystem.clear_instance_cache()
    server.post("/moto-api/reset-auth", b"0")


# (the action refused, on which object, the store's call, the request and object its message names)
REFUSALS = {
    "progress record": (
        "s3:PutObject",
        "manifest.json.partial",
        lambda store: store.publish("manifest.json", b"{}", complete=False),
        "writing",
    ),
    "publication": (
        "s3:PutObject",
        "manifest.json",
        lambda store: store.publish("manifest.json", b"{}", complete=True),
        "publishing",
    ),
    "removal of the progress record": (
        "s3:DeleteObject",
        "manifest.json.partial",
        lambda store: store.publish("manifest.json", b"{}", complete=True),
        "removing",
    ),
    "read-back of a shard already there": (
        "s3:GetObject",
        "shard",
        lambda store: store.write("shard", DATA),
        "reading",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refused_request_is_one_line_naming_it_and_the_object(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    action, name, call, doing = REFUSALS[case]
    url = f"s3://{s3_bucket}/cache"
    open_store(url).write("shard", DATA)
    open_store(url).publish("manifest.json", b'{"rows": 0}', complete=False)
    try:
        refuse(s3_env, monkeypatch, action, f"{s3_bucket}/cache/{name}")
        with pytest.raises(StoreError) as info:
            call(open_store(url))
    finally:
        s3_env.post("/moto-api/reset-auth", b"inf")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, OSError), message
    assert message.startswith(f"{doing} {url}/{name} failed: PermissionError: "), message
    assert message.endswith("AWS_PROFILE) and the bucket's permissions."), message
    store = open_store(url)
    assert isinstance(store, RemoteStore)
    stored = {path.rsplit("/", 1)[-1] for path in store.fs.find(store._root)}
    # a refused publication publishes nothing; a refused removal leaves the progress record beside the manifest
    assert "manifest.json" in stored if case == "removal of the progress record" else "manifest.json" not in stored


def test_a_manifest_is_published_where_no_progress_record_exists(tmp_path: Path) -> None:
    """A cache written in one go has no ``manifest.json.partial`` to remove: S3 deletes a missing object without a
    word, fsspec's ``local://`` raises ``FileNotFoundError``, which publishing must take as done."""
    (tmp_path / "cache").mkdir()
    store = open_store(f"local://{tmp_path}/cache")
    store.publish("manifest.json", b"{}", complete=True)
    store.publish("manifest.json", b"{other}", complete=True)  # a second writer's publication leaves the first
    assert [(p.name, p.read_bytes()) for p in (tmp_path / "cache").iterdir()] == [("manifest.json", b"{}")]
