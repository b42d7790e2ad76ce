"""Shared fixtures: a real S3 endpoint on loopback (moto's threaded server) for object-storage tests, a tiny synthetic
corpus, and one-thread torch for tiny models."""
import os
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 server on 127.0.0.1 (random port) once per test session; yield its endpoint URL."""
    import moto.server as moto_server  # a dev dependency: missing, the S3 tests error instead of skipping
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        os.environ.setdefault(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback endpoint; yields (bucket_url, storage_options)."""
    import s3fs
    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3_server,
            "client_kwargs": {"region_name": "eu-west-1"}}
    fs = s3fs.S3FileSystem(**opts)
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)  # region eu-west-1: us-east-1 bucket creation via s3fs fails on moto
    fs.invalidate_cache()
    yield f"s3://{name}", opts


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A few dozen seconds of synthetic multi-speaker speech (espeak-ng) with lhotse cut manifests."""
    from distill.synth.corpus import make_corpus

    out = tmp_path_factory.mktemp("corpus") / "c"
    return make_corpus(str(out), hours=0.006, dev_hours=0.002, test_hours=0.002, seed=3, progress=False)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models run faster on one thread than on two contended ones on the
    shared CI cores (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
