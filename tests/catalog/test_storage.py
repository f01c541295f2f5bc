"""Storage URLs, atomic writes and credential hygiene."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from relaymap.catalog.storage import (
    StorageError,
    atomic_upload,
    atomic_write,
    check_id,
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


BAD_IDS = ["../x", "a/b", "/etc/passwd", "..", "a..b", "%2e%2e", "x%2Fy", "é", "naïve", ""]
BAD_IDS += ["-x", ".hidden", "a b", "a\\b", "x" * 129]


class TestUntrustedIds:
    @pytest.mark.parametrize("bad", BAD_IDS)
    def test_unsafe_ids_are_refused(self, bad):
        with pytest.raises(ValueError, match="not a safe id"):
            check_id(bad, "item id")

    @pytest.mark.parametrize(
        "good", ["S2B_33TWN_20240601_0_L2A", "sample-03", "a.b_c-1", "x" * 128]
    )
    def test_real_ids_pass(self, good):
        assert check_id(good) == good

    def test_a_static_catalog_writes_nothing_outside_its_root(self, tmp_path):
        import pystac

        from relaymap.catalog import StaticCatalog

        root = tmp_path / "cat"
        catalog = StaticCatalog(str(root))
        for cid, iid in (("maps", "../../evil"), ("../maps", "ok"), ("maps", "a/b")):
            item = pystac.Item(iid, None, None, dt.datetime(2024, 1, 1), {}, collection=cid)
            with pytest.raises(ValueError, match="not a safe id"):
                catalog.add_items([item])
            with pytest.raises(ValueError, match="not a safe id"):
                catalog.get_item(cid, iid)
        assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing, anywhere

    def test_a_stac_api_request_never_leaves_its_collection(self):
        from relaymap.catalog.backends import StacApiCatalog

        api = StacApiCatalog("http://127.0.0.1:9")  # nothing listens: no request is made
        with pytest.raises(ValueError, match="collection id 'other/items/x' is not a safe id"):
            api.get_item("other/items/x", "y")
        with pytest.raises(ValueError, match=r"item id '\.\./\.\./collections/x' is not a safe id"):
            api.get_item("maps", "../../collections/x")
