"""Transient storage faults: which errors count as transient (fsio.is_transient), the retry policy, and a store
written and read through a loopback S3 endpoint that fails a fraction of requests (tests/faulty_s3.py: moto behind a
proxy answering 503 SlowDown, resetting connections before or after forwarding, cutting bodies short)."""
import errno
import os
import pickle
import random
import sys

import numpy as np
import pytest

from ci_store import StoreError, create, open_store, plan_shards
from ci_store.fsio import NO_RETRY, RetryPolicy, RetryStats, is_transient, retry_call
from ci_store.verify import verify_store

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faulty_s3 import TRANSIENT_KINDS, FaultyProxy  # noqa: E402

NCB = 8
FAST = RetryPolicy(attempts=10, base_delay=0.005, max_delay=0.05)
# the client libraries' own retries off, so every fault reaches ci_store's retry layer (aiohttp still retries an
# idempotent request once when a kept-alive connection drops; the counts below allow for it)
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}


def client_error(status, code, op="GetObject"):
    from botocore.exceptions import ClientError
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def s3fs_wrapped(status, code):
    """What s3fs raises after its own retries: an OSError/PermissionError/... with the ClientError as __cause__."""
    from s3fs.errors import translate_boto_error
    return translate_boto_error(client_error(status, code))


def test_is_transient_classifies_what_storage_clients_raise():
    from aiohttp import ClientPayloadError, ServerDisconnectedError
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    transient = [
        client_error(503, "SlowDown"), client_error(500, "InternalError"), client_error(503, "ServiceUnavailable"),
        client_error(429, "TooManyRequests"), client_error(409, "ConditionalRequestConflict", "PutObject"),
        s3fs_wrapped(503, "SlowDown"), s3fs_wrapped(500, "InternalError"),
        ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("timed out"), BrokenPipeError(),
        OSError(errno.ETIMEDOUT, "timed out"), OSError(errno.ESTALE, "stale NFS handle"),
        EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"), ServerDisconnectedError(), ClientPayloadError("cut short"),
    ]
    permanent = [
        client_error(403, "AccessDenied"), client_error(404, "NoSuchKey"), client_error(400, "InvalidRequest"),
        client_error(412, "PreconditionFailed", "PutObject"), client_error(409, "BucketAlreadyExists"),
        s3fs_wrapped(403, "AccessDenied"), s3fs_wrapped(404, "NoSuchKey"),
        s3fs_wrapped(412, "PreconditionFailed"), FileNotFoundError("k"), PermissionError("denied"),
        FileExistsError("k"), ValueError("bad data"), StoreError("corrupt"), OSError(errno.EIO, "disk error"),
        OSError(errno.ENOSPC, "full"), RuntimeError("bug"), KeyError("x"),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []
    # a permanent error is permanent whatever it was raised from; a generic wrapper takes its cause's nature
    try:
        raise ValueError("bad") from ConnectionResetError()
    except ValueError as e:
        assert not is_transient(e)
    try:
        raise OSError("wrapped") from client_error(503, "SlowDown")
    except OSError as e:
        assert is_transient(e)


def test_retry_policy_backoff_is_exponential_jittered_and_capped():
    p = RetryPolicy(attempts=8, base_delay=0.1, max_delay=1.0)
    rng = random.Random(0)
    for k, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (7, 1.0)]:
        delays = [p.delay(k, rng) for _ in range(200)]
        assert min(delays) >= cap / 2 and max(delays) <= cap
        assert max(delays) - min(delays) > cap / 4            # jittered, not one fixed value
    for bad in (dict(attempts=0), dict(attempts=1.5), dict(base_delay=2.0, max_delay=1.0)):
        with pytest.raises(StoreError, match="RetryPolicy"):
            RetryPolicy(**bad)


def test_retry_call_retries_transient_errors_only_and_says_when_it_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return "data"
    stats = RetryStats()
    assert retry_call(flaky, what="s3://b/k: get", policy=FAST, stats=stats) == "data"
    assert (len(calls), stats.retries, stats.by_error) == (3, 2, {"ConnectionResetError": 2})

    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("403 AccessDenied")
    with pytest.raises(PermissionError):
        retry_call(denied, what="s3://b/k: get", policy=FAST)
    assert len(calls) == 1

    calls.clear()

    def down():
        calls.append(1)
        raise s3fs_wrapped(503, "SlowDown")
    with pytest.raises(StoreError, match=r"s3://b/k: set failed after 4 attempts with transient errors") as err:
        retry_call(down, what="s3://b/k: set", policy=RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.001),
                   stats=stats)
    assert len(calls) == 4 and stats.gave_up == 1 and is_transient(err.value.__cause__)


def test_retry_policy_travels_with_a_pickled_store(tmp_path, corpus):
    utts, _ = corpus
    st = create(str(tmp_path / "s"), plan_shards(utts, 2048), num_codebooks=NCB, frame_rate=50.0, retry=FAST)
    again = pickle.loads(pickle.dumps(st))
    assert again.retry == FAST and again._handle().objects.retry == FAST
    assert open_store(st.url)._handle().objects.retry == RetryPolicy()
    with pytest.raises(StoreError, match="RetryPolicy"):
        open_store(st.url, retry=3)


# --- a store through a faulty S3 endpoint ---------------------------------------------------------------------------
@pytest.fixture
def corpus():
    rng = np.random.default_rng(3)
    utts = [(f"spk{i % 5}-u{i:03d}", int(rng.integers(40, 300))) for i in range(60)]
    return utts, {u: rng.integers(0, 256, (n, NCB)).astype(np.uint8) for u, n in utts}


@pytest.fixture
def faulty(s3_server, s3_bucket, monkeypatch):
    """(clean bucket url, clean options, options through a proxy failing 30% of requests, the proxy)."""
    import s3fs
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)       # s3fs's own retry loop off as well
    proxy = FaultyProxy(s3_server, rate=0.3, seed=11)
    endpoint = proxy.start()
    url, opts = s3_bucket
    yield url, opts, {**opts, "endpoint_url": endpoint, **NO_CLIENT_RETRIES}, proxy
    proxy.stop()


def s3_objects(opts, url):
    import s3fs
    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    base = url[len("s3://"):]
    return {k[len(base) + 1:]: fs.cat_file(k) for k in fs.find(base)}


def write(url, opts, plan, data, retry):
    st = create(url, plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=64, storage_options=opts, retry=retry)
    for sh in plan.shards:
        st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
    return st


def test_store_through_faulty_s3_equals_the_fault_free_store(faulty, corpus):
    url, clean, flaky, proxy = faulty
    utts, data = corpus
    plan = plan_shards(utts, 2048)
    write(f"{url}/clean", clean, plan, data, FAST)
    st = write(f"{url}/flaky", flaky, plan, data, FAST)
    ro = open_store(f"{url}/flaky", storage_options=flaky, retry=FAST)
    ids = [u for u, _ in utts]
    assert all(np.array_equal(a, data[u]) for u, a in zip(ids, ro.get_many(ids)))
    assert all(np.array_equal(ro[u], data[u]) for u in ids[::7])
    assert verify_store(ro) == []                               # verify reads through the faulty endpoint too
    assert s3_objects(clean, f"{url}/flaky") == s3_objects(clean, f"{url}/clean")
    assert {k for k, n in proxy.faults.items() if n} == set(TRANSIENT_KINDS) and proxy.injected >= 20
    retries = st._handle().objects.stats.retries + ro._handle().objects.stats.retries
    assert retries > 0


def test_without_retries_faults_fail_loudly_and_a_rerun_completes_the_store(faulty, corpus):
    url, clean, flaky, proxy = faulty
    utts, data = corpus
    plan = plan_shards(utts, 2048)
    create(f"{url}/s", plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=64, storage_options=clean)
    failed = []
    for sh in plan.shards:
        try:     # a fresh handle per shard, as a task on a fresh worker would open it
            st = open_store(f"{url}/s", mode="r+", storage_options=flaky, retry=NO_RETRY)
            st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
        except StoreError as e:
            assert "failed after 1 attempt with transient errors" in str(e)
            failed.append(sh.index)
    assert failed                                               # the faults are real and surface as StoreError
    done = open_store(f"{url}/s", storage_options=clean).completed_shards()
    assert set(range(plan.num_shards)) - set(failed) <= done    # (a record whose answer was lost is there too)
    again = open_store(f"{url}/s", mode="r+", storage_options=flaky, retry=FAST)
    for s in failed:       # claims left by writers that gave up name the same labels, so they do not block
        again.write_shard(s, {u: data[u] for u in plan.shards[s].utt_ids})
    assert verify_store(f"{url}/s", storage_options=clean) == []
    ro = open_store(f"{url}/s", storage_options=clean)
    assert all(np.array_equal(ro[u], data[u]) for u, _ in utts)


def test_permanent_errors_are_not_retried(s3_server, s3_bucket, corpus, monkeypatch):
    import s3fs
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    url, opts = s3_bucket
    utts, data = corpus
    write(f"{url}/s", opts, plan_shards(utts, 2048), data, FAST)
    proxy = FaultyProxy(s3_server, rate=1.0, seed=0, kinds=("forbidden",))
    endpoint = proxy.start()
    try:
        with pytest.raises(PermissionError):
            open_store(f"{url}/s", storage_options={**opts, "endpoint_url": endpoint, **NO_CLIENT_RETRIES},
                       retry=FAST)
        assert proxy.requests == 1
    finally:
        proxy.stop()
