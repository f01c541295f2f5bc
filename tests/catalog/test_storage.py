"""Storage URLs, atomic writes and credential hygiene."""

from __future__ import annotations

import os

import pytest

from relaymap.catalog.storage import (
    StorageError,
    atomic_upload,
    atomic_write,
    exists,
    filesystem,
    gdal_env,
    read_bytes,
    redact,
)
from tests.services import environ


@pytest.mark.parametrize("root", ["local", "s3"])
def test_atomic_write_replaces_whole_objects(root, tmp_path, s3):
    base = str(tmp_path) if root == "local" else "s3://relaymap-test/atomic"
    url = f"{base}/a/b.json"
    atomic_write(url, b"first")
    atomic_write(url, b"second")
    assert read_bytes(url) == b"second"
    fs, path = filesystem(f"{base}/a")
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] == ["b.json"]


@pytest.mark.parametrize("root", ["local", "s3"])
def test_failed_upload_leaves_nothing(root, tmp_path, s3):
    base = str(tmp_path) if root == "local" else "s3://relaymap-test/failed"
    url = f"{base}/product.tif"
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_upload(url) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half a product")
        raise RuntimeError("writer crashed")
    assert not exists(url)
    fs, path = filesystem(base)
    assert not fs.exists(path) or fs.ls(path, detail=False) == []


def test_upload_commits(tmp_path, s3):
    url = "s3://relaymap-test/upload/x.bin"
    with atomic_upload(url) as tmp, open(tmp, "wb") as f:
        f.write(b"payload")
    assert read_bytes(url) == b"payload"
    assert not os.path.exists(tmp)


def test_unreachable_endpoint_is_a_storage_error_without_secrets():
    from relaymap.catalog.server import free_port

    secret = "very-secret-value-123"
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "id-1234",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
    }
    with (
        environ(env),
        pytest.raises(StorageError, match=r"cannot write s3://nowhere-bucket/x\.json") as err,
    ):
        atomic_write("s3://nowhere-bucket/x.json", b"x")
    assert secret not in str(err.value) and "id-1234" not in str(err.value)


def test_redact():
    text = "aws_secret_access_key=abc123XYZ token: 'tok-999' url=s3://b/k"
    out = redact(text)
    assert "abc123XYZ" not in out and "tok-999" not in out and "s3://b/k" in out
    with environ({"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}):
        assert "s3cr3t-value" not in redact("failed with s3cr3t-value in the url")


def test_gdal_env_follows_the_aws_endpoint():
    with environ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}):
        env = gdal_env()
    assert env["AWS_S3_ENDPOINT"] == "127.0.0.1:9000"
    assert env["AWS_HTTPS"] == "NO" and env["AWS_VIRTUAL_HOSTING"] == "FALSE"


def test_storage_config_sets_the_standard_variables():
    from relaymap.catalog import StorageConfig

    with environ({"AWS_ENDPOINT_URL": "http://old:1", "AWS_REGION": "x"}):
        StorageConfig(endpoint_url="http://127.0.0.1:9000", region="eu-west-1").apply()
        assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
        assert os.environ["AWS_REGION"] == "eu-west-1"
        assert gdal_env()["AWS_S3_ENDPOINT"] == "127.0.0.1:9000"
