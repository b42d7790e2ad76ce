"""Transient vs permanent storage faults when reading audio: real faults from a real fsspec filesystem and from S3
(moto behind a proxy answering 503 SlowDown); transient ones are retried, corrupt/missing files fail at once."""
import errno
import os

import numpy as np
import pytest
import soundfile as sf

from distill.data.audio import AudioError, is_transient_io_error, probe_utterance, read_audio
from distill.data.manifest import Utterance
from fault_injection import FlakyFileSystem, SlowDownProxy, register


@pytest.fixture(autouse=True)
def flaky():
    register()
    FlakyFileSystem.reset()
    yield FlakyFileSystem
    FlakyFileSystem.reset()


@pytest.fixture
def flac(tmp_path):
    x = (0.3 * np.sin(np.arange(48000) * 0.05)).astype(np.float32)
    path = str(tmp_path / "a.flac")
    sf.write(path, x, 16000, subtype="PCM_16")
    return path, read_audio(Utterance(id="a", audio=path), 16000)


def _retries():
    seen = []
    return seen, lambda e, attempt, delay: seen.append((attempt, e.transient, e.reason))


def test_open_faults_are_retried_until_the_read_succeeds(flaky, flac):
    path, clean = flac
    flaky.plan(path, ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), TimeoutError("timed out"))
    seen, on_retry = _retries()
    out = read_audio(Utterance(id="a", audio=f"flaky://{path}"), 16000, attempts=5, backoff=0.001,
                     on_retry=on_retry)
    np.testing.assert_array_equal(out, clean)
    assert flaky.count(path) == 3
    assert [a for a, _, _ in seen] == [1, 2] and all(t for _, t, _ in seen)
    assert "ConnectionResetError" in seen[0][2] and "TimeoutError" in seen[1][2]


def test_reset_in_the_middle_of_the_data_is_retried_not_taken_for_truncation(flaky, flac):
    """libsndfile reads through callbacks that swallow exceptions: without the fault recorder this read would end
    early and be recorded, permanently, as a truncated file."""
    path, clean = flac
    flaky.plan(path, (ConnectionResetError(errno.ECONNRESET, "reset mid-read"), 20_000))
    seen, on_retry = _retries()
    out = read_audio(Utterance(id="a", audio=f"flaky://{path}"), 16000, attempts=3, backoff=0.001,
                     on_retry=on_retry)
    np.testing.assert_array_equal(out, clean)
    assert flaky.count(path) == 2 and len(seen) == 1 and "reading the audio failed" in seen[0][2]


def test_attempts_are_bounded_and_the_reason_says_so(flaky, flac):
    path, _ = flac
    flaky.plan(path, *[ConnectionResetError(errno.ECONNRESET, "reset")] * 5)
    with pytest.raises(AudioError) as ei:
        read_audio(Utterance(id="a", audio=f"flaky://{path}"), 16000, attempts=3, backoff=0.001)
    assert ei.value.transient and "still failing after 3 attempts" in ei.value.reason
    assert flaky.count(path) == 3


@pytest.mark.parametrize("case", ["corrupt", "missing", "empty"])
def test_permanent_faults_fail_at_once(flaky, tmp_path, case):
    path = str(tmp_path / f"{case}.flac")
    if case == "corrupt":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(3000))
    elif case == "empty":
        open(path, "wb").close()
    seen, on_retry = _retries()
    with pytest.raises(AudioError) as ei:
        read_audio(Utterance(id="u", audio=f"flaky://{path}"), 16000, attempts=5, backoff=0.001, on_retry=on_retry)
    assert not ei.value.transient and seen == []
    assert flaky.count(path) == 1
    assert {"corrupt": "corrupt", "missing": "not found", "empty": "empty"}[case] in ei.value.reason


def test_probe_retries_a_throttled_header_read(flaky, flac):
    """Planning probes headers: a transient fault there must not plan the utterance as empty."""
    path, clean = flac
    flaky.plan(path, ConnectionResetError(errno.ECONNRESET, "reset"))
    u = probe_utterance(Utterance(id="a", audio=f"flaky://{path}"), backoff=0.001)
    assert u.num_samples == len(clean) and u.sample_rate == 16000 and flaky.count(path) == 2


def test_classification_of_real_library_errors():
    import aiohttp
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
    from s3fs.errors import translate_boto_error

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    slowdown = client_error("SlowDown", 503)
    via_s3fs = translate_boto_error(slowdown)  # what s3fs raises: OSError(EBUSY) caused by the ClientError
    assert isinstance(via_s3fs, OSError)
    transient = [slowdown, via_s3fs, client_error("InternalError", 500), client_error("Throttling", 400),
                 EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
                 aiohttp.ServerDisconnectedError(), ConnectionResetError(), TimeoutError(), BrokenPipeError(),
                 OSError(errno.ETIMEDOUT, "t"), OSError(errno.ECONNRESET, "r")]
    permanent = [client_error("NoSuchKey", 404), translate_boto_error(client_error("NoSuchKey", 404)),
                 client_error("AccessDenied", 403), FileNotFoundError(), PermissionError(), IsADirectoryError(),
                 OSError(errno.EINVAL, "bad"), ValueError("x"), sf.LibsndfileError(1, "Format not recognised")]
    assert [is_transient_io_error(e) for e in transient] == [True] * len(transient)
    assert [is_transient_io_error(e) for e in permanent] == [False] * len(permanent)
    wrapped = RuntimeError("lhotse could not load")
    wrapped.__cause__ = slowdown
    assert is_transient_io_error(wrapped)


def test_s3_slowdown_is_retried_and_a_corrupt_object_is_not(s3_server, s3_bucket, flac):
    """moto behind a proxy that answers 503 SlowDown to as many requests as s3fs retries a call (botocore's own
    retries off), so s3fs gives up once, as under a sustained throttle, and the fault reaches our code."""
    import fsspec
    import s3fs

    url, opts = s3_bucket
    path, clean = flac
    bucket = url[len("s3://"):]
    with open(path, "rb") as f:
        good = f.read()
    for name, data in (("good.flac", good), ("bad.flac", os.urandom(3000))):
        with fsspec.open(f"{url}/{name}", "wb", **opts) as f:
            f.write(data)
    with SlowDownProxy(s3_server) as proxy:
        popts = {**opts, "endpoint_url": proxy.url,
                 "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
        n = s3fs.S3FileSystem.retries
        proxy.throttle(f"{bucket}/good.flac", n)
        proxy.throttle(f"{bucket}/bad.flac", 0)
        seen, on_retry = _retries()
        out = read_audio(Utterance(id="g", audio=f"{url}/good.flac"), 16000, storage_options=popts, attempts=5,
                         backoff=0.001, on_retry=on_retry)
        np.testing.assert_array_equal(out, clean)
        assert proxy.throttled[f"{bucket}/good.flac"] == n and 1 <= len(seen) <= n
        assert all(t and "transient storage error" in r for _, t, r in seen)
        seen, on_retry = _retries()
        with pytest.raises(AudioError, match="corrupt") as ei:
            read_audio(Utterance(id="b", audio=f"{url}/bad.flac"), 16000, storage_options=popts, attempts=5,
                       backoff=0.001, on_retry=on_retry)
        assert not ei.value.transient and seen == [] and proxy.requests[f"{bucket}/bad.flac"] >= 1
