"""The photos object stores (gridd.photos.storage): one contract on a local directory and on a real S3 endpoint.

The ``store`` fixture yields an empty store of each kind: a ``LocalStore``
in a temporary directory, and an ``S3Store`` on a new bucket of the
session's moto server (tests/motoserver.py), spoken to by boto3 over HTTP.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from gridd.photos.storage import (
    RETRY_DELAYS,
    LocalStore,
    ObjectMissing,
    S3Store,
    StorageError,
    meta_key,
    open_store,
    photo_prefix,
    rendition_key,
    sha_of_meta_key,
)

SHA = hashlib.sha256(b"a photo").hexdigest()
OTHER = hashlib.sha256(b"another photo").hexdigest()

KINDS = ["local", pytest.param("s3", marks=pytest.mark.s3), pytest.param("s3-prefix", marks=pytest.mark.s3)]


class Sleeps(list):
    """A ``sleep`` that records its delays instead of waiting, and may run something at each."""

    def __init__(self, each=None):
        super().__init__()
        self.each = each

    def __call__(self, seconds):
        self.append(seconds)
        if self.each is not None:
            self.each()


@pytest.fixture(params=KINDS)
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store", sleep=Sleeps())
    moto = request.getfixturevalue("moto_s3")
    prefix = "site/a" if request.param == "s3-prefix" else ""
    return S3Store(moto.bucket(), prefix, endpoint_url=moto.endpoint, sleep=Sleeps())


# -- keys ----------------------------------------------------------------------


def test_keys_derive_from_the_hash_and_the_width():
    """A rendition's key is photos/{sha[:2]}/{sha}/{width}.{ext}; the document's is .../meta.json."""
    assert rendition_key(SHA, 640, "JPEG") == f"photos/{SHA[:2]}/{SHA}/640.jpg"
    assert rendition_key(SHA, 320, "webp") == f"photos/{SHA[:2]}/{SHA}/320.webp"
    assert meta_key(SHA) == f"photos/{SHA[:2]}/{SHA}/meta.json"
    assert photo_prefix(SHA) == f"photos/{SHA[:2]}/{SHA}/"
    assert sha_of_meta_key(meta_key(SHA)) == SHA
    assert sha_of_meta_key(rendition_key(SHA, 640, "JPEG")) is None
    assert sha_of_meta_key(f"photos/00/{SHA}/meta.json") is None  # the folder must be the hash's start


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: meta_key("ABC"), "not a SHA-256"),
        (lambda: meta_key(SHA.upper()), "not a SHA-256"),
        (lambda: rendition_key(SHA, 0, "JPEG"), "positive integer"),
        (lambda: rendition_key(SHA, True, "JPEG"), "positive integer"),
        (lambda: rendition_key(SHA, 640, "TIFF"), "unknown rendition format"),
    ],
)
def test_keys_refuse_bad_parts(call, message):
    """A bad hash, width or format is a ValueError that says which."""
    with pytest.raises(ValueError, match=message):
        call()


# -- the contract ----------------------------------------------------------------


def test_store_put_then_get_returns_the_bytes(store):
    """What is put can be read back, and exists."""
    key = rendition_key(SHA, 640, "JPEG")
    assert not store.exists(key)
    url = store.put(key, b"\xff\xd8jpeg bytes", "image/jpeg")
    assert url == store.url(key)
    assert store.get(key) == b"\xff\xd8jpeg bytes"
    assert store.exists(key)


def test_store_put_again_replaces_the_object_under_the_same_key(store):
    """Writing the same photo twice leaves one object per key, holding the last write."""
    keys = [rendition_key(SHA, 320, "JPEG"), meta_key(SHA)]
    for attempt in (b"first", b"second"):
        for key in keys:
            store.put(key, attempt, "application/octet-stream")
    assert list(store.list()) == sorted(keys)
    assert [store.get(key) for key in keys] == [b"second", b"second"]


def test_store_lists_keys_under_a_prefix_in_order(store):
    """list(prefix) yields every key starting with the prefix, sorted, and nothing else."""
    keys = [meta_key(OTHER), rendition_key(SHA, 2048, "JPEG"), rendition_key(SHA, 320, "JPEG"), meta_key(SHA)]
    for key in keys:
        store.put(key, b"x", "image/jpeg")
    assert list(store.list()) == sorted(keys)
    assert list(store.list("photos/")) == sorted(keys)
    assert list(store.list(photo_prefix(SHA))) == sorted(keys[1:])
    assert list(store.list(f"photos/{SHA[:2]}/{SHA}/3")) == [rendition_key(SHA, 320, "JPEG")]
    assert list(store.list("nothing/")) == []


def test_store_get_of_a_missing_key_is_object_missing(store):
    """Reading a key that was never written raises ObjectMissing at once, without retries."""
    with pytest.raises(ObjectMissing, match="meta.json"):
        store.get(meta_key(SHA))
    assert store._sleep == []


@pytest.mark.parametrize("key", ["", "/etc/passwd", "photos/../x", "photos//x", "photos/./x", "a\\b"])
def test_store_refuses_a_bad_key(store, key):
    """A key that is not a plain relative path is a ValueError, for every operation."""
    for call in (lambda: store.put(key, b"x", "text/plain"), lambda: store.get(key), lambda: store.exists(key)):
        with pytest.raises(ValueError, match="bad object key"):
            call()


# -- the local directory ------------------------------------------------------------


def test_local_store_writes_files_under_its_root_atomically(tmp_path):
    """An object is a file at root/key, its URL file://; a leftover temporary file is not listed."""
    store = LocalStore(tmp_path / "root")
    key = meta_key(SHA)
    assert store.put(key, b"{}", "application/json") == (tmp_path / "root" / key).as_uri()
    assert (tmp_path / "root" / key).read_bytes() == b"{}"
    (tmp_path / "root" / photo_prefix(SHA) / ".640.jpg.abc123.tmp").write_bytes(b"half")
    assert list(store.list()) == [key]
    assert sorted(os.listdir(tmp_path / "root" / photo_prefix(SHA))) == [".640.jpg.abc123.tmp", "meta.json"]


def test_local_store_refused_write_is_retried_then_storage_error(tmp_path):
    """A write the file system refuses (the root is a file) is tried again after each delay, then StorageError."""
    (tmp_path / "root").write_bytes(b"not a directory")
    sleeps = Sleeps()
    store = LocalStore(tmp_path / "root", sleep=sleeps)
    with pytest.raises(StorageError, match="failed 5 times"):
        store.put(meta_key(SHA), b"{}", "application/json")
    assert sleeps == list(RETRY_DELAYS)


def test_local_store_write_succeeds_once_the_refusal_ends(tmp_path):
    """A write refused at first succeeds on a later try, within the bound."""
    (tmp_path / "root").write_bytes(b"not a directory")

    def repair():
        if len(sleeps) == 2:
            (tmp_path / "root").unlink()

    sleeps = Sleeps(repair)
    store = LocalStore(tmp_path / "root", sleep=sleeps)
    store.put(meta_key(SHA), b"{}", "application/json")
    assert store.get(meta_key(SHA)) == b"{}"
    assert sleeps == list(RETRY_DELAYS[:2])


# -- S3 ------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_store_writes_objects_with_their_content_type_under_the_prefix(moto_s3):
    """put writes prefix/key with its Content-Type; the URL is s3://bucket/prefix/key."""
    bucket = moto_s3.bucket()
    store = S3Store(bucket, "/site/", endpoint_url=moto_s3.endpoint)
    key = rendition_key(SHA, 640, "JPEG")
    assert store.put(key, b"jpeg", "image/jpeg") == f"s3://{bucket}/site/{key}"
    head = moto_s3.client().head_object(Bucket=bucket, Key=f"site/{key}")
    assert head["ContentType"] == "image/jpeg"
    assert head["ContentLength"] == 4


@pytest.mark.s3
def test_s3_store_write_to_a_missing_bucket_is_retried_then_storage_error(moto_s3):
    """The server refusing every write (no such bucket) means a try after each delay, then StorageError."""
    sleeps = Sleeps()
    store = S3Store("gridd-no-such-bucket", endpoint_url=moto_s3.endpoint, sleep=sleeps)
    with pytest.raises(StorageError, match="failed 5 times.*NoSuchBucket"):
        store.put(meta_key(SHA), b"{}", "application/json")
    assert sleeps == list(RETRY_DELAYS)


@pytest.mark.s3
def test_s3_store_write_succeeds_once_the_bucket_exists(moto_s3):
    """A write refused at first succeeds on a later try: here the bucket is created during the first wait."""
    client = moto_s3.client()
    sleeps = Sleeps(lambda: client.create_bucket(Bucket="gridd-created-late"))
    store = S3Store("gridd-created-late", endpoint_url=moto_s3.endpoint, sleep=sleeps)
    store.put(meta_key(SHA), b"{}", "application/json")
    assert sleeps == [RETRY_DELAYS[0]]
    assert client.get_object(Bucket="gridd-created-late", Key=meta_key(SHA))["Body"].read() == b"{}"


@pytest.mark.s3
def test_s3_store_unreachable_endpoint_is_retried_then_storage_error(moto_s3):
    """Nothing listening at the endpoint: every try fails to connect, then StorageError names the cause."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        sleeps = Sleeps()
        store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{port}", sleep=sleeps)
        with pytest.raises(StorageError, match="failed 5 times.*EndpointConnectionError"):
            store.put(meta_key(SHA), b"{}", "application/json")
    assert sleeps == list(RETRY_DELAYS)


@pytest.mark.s3
def test_s3_store_without_credentials_fails_at_once(moto_s3, monkeypatch, tmp_path):
    """No credentials anywhere in the AWS chain: a clear StorageError, and no retries."""
    bucket = moto_s3.bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    sleeps = Sleeps()
    store = S3Store(bucket, endpoint_url=moto_s3.endpoint, sleep=sleeps)
    with pytest.raises(StorageError, match="no AWS credentials"):
        store.put(meta_key(SHA), b"{}", "application/json")
    assert sleeps == []


# -- URLs ------------------------------------------------------------------------------


def test_open_store_file_urls(tmp_path, monkeypatch):
    """file:///abs names an absolute directory, file://./rel one relative to the current directory."""
    store = open_store(f"file://{tmp_path}/abs")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "abs"
    monkeypatch.chdir(tmp_path)
    store = open_store("file://./gridd-photos")
    assert store.root == tmp_path / "gridd-photos"
    store.put(meta_key(SHA), b"{}", "application/json")
    assert (tmp_path / "gridd-photos" / meta_key(SHA)).is_file()


def test_open_store_s3_url_with_endpoint_and_prefix():
    """s3://bucket/prefix?endpoint=URL&region=R names the bucket, the prefix, the endpoint and the region."""
    store = open_store("s3://photos-bucket/site/uploads?endpoint=http://127.0.0.1:9000&region=eu-west-1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        "photos-bucket",
        "site/uploads/",
        "http://127.0.0.1:9000",
    )
    assert store.client.meta.region_name == "eu-west-1"
    assert store.url("photos/x") == "s3://photos-bucket/site/uploads/photos/x"
    assert open_store("s3://b").prefix == ""


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/just/a/path", "not a store URL"),
        ("ftp://host/dir", "unknown store scheme 'ftp'"),
        ("file://host/dir", "would be a host name"),
        ("file:///", "names no directory"),
        ("file:///dir?mode=x", "takes no options"),
        ("s3:///prefix", "names no bucket"),
        ("s3://b/p?endpoint=127.0.0.1:9000", "must be an http"),
        ("s3://b/p?acl=public", "unknown option"),
    ],
)
def test_open_store_refuses_bad_urls(url, message):
    """A URL that names no store is a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        open_store(url)
