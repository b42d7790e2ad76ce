"""The loopback S3 endpoint used by the object-storage tests really stores and returns bytes."""
import fsspec


def test_s3_roundtrip(s3_bucket):
    url, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    fs.pipe(f"{url}/hello.bin", b"\x00\x01ci")
    fs.invalidate_cache()
    assert fs.cat(f"{url}/hello.bin") == b"\x00\x01ci"
    assert fs.ls(url, detail=False) == [f"{url[5:]}/hello.bin"]
