"""Two writers of one shard (a zombie task and its retry, two runs on one store) on local disk and on S3 (moto):
identical content -> both succeed, one record; different content -> one wins, the other gets a StoreError naming the
shard, and the winner's shard is never touched. Races are real (threads and processes started together), and the
interleavings that matter most are also forced by holding one writer at a chosen step.

moto checks If-None-Match in its request handler without a lock (AWS S3 makes the check atomic); we have not seen
it grant one key twice (0 double grants in 900 racing PUTs from 3 threads), but it is not guaranteed.
"""
import multiprocessing as mp
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from ci_store import StoreError, create, open_store, plan_shards
from ci_store.completion import claim_key
from ci_store.format import done_key, shard_key
from ci_store.fsio import ObjectStore, create_file
from ci_store.verify import verify_store

NCB = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def utterances():
    rng = np.random.default_rng(5)
    return [(f"u{i:03d}", int(rng.integers(20, 120))) for i in range(36)]


def labels(utts, seed):
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 256, (n, NCB)).astype(np.uint8) for u, n in utts}


def variant(data, plan):
    """Other labels for the first utterance of every shard (what a nondeterministic rerun might produce)."""
    out = {u: a.copy() for u, a in data.items()}
    for sh in plan.shards:
        out[sh.utt_ids[0]][0, 0] ^= 0xFF
    return out


def shard_arrays(data, sh):
    return {u: data[u] for u in sh.utt_ids}


def local_objects(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    """(store url, storage_options, a function listing every object under the store as {key: bytes})."""
    if request.param == "local":
        root = str(tmp_path / "store")
        return root, None, lambda url=root: local_objects(url)
    import s3fs
    bucket, opts = request.getfixturevalue("s3_bucket")
    url = f"{bucket}/store"

    def objects(url=url):
        fs = s3fs.S3FileSystem(**opts)
        fs.invalidate_cache()
        base = url[len("s3://"):]
        return {k[len(base) + 1:]: fs.cat_file(k) for k in fs.find(base)}
    return url, opts, objects


def new_store(url, opts, plan):
    return create(url, plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=32, storage_options=opts)


def race(jobs):
    """Run callables in threads released together; returns ("ok", value) or ("error", exception) per job."""
    barrier = threading.Barrier(len(jobs))
    out = [None] * len(jobs)

    def run(i, job):
        barrier.wait()
        try:
            out[i] = ("ok", job())
        except Exception as e:  # noqa: BLE001 - the test inspects every outcome
            out[i] = ("error", e)
    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# --- the create-if-absent primitive ---------------------------------------------------------------------------------
def test_local_create_if_absent_has_one_winner_under_racing_threads(tmp_path):
    for k in range(30):
        path = str(tmp_path / "d" / f"k{k}")
        outcome = race([lambda i=i: create_file(path, f"writer {i}".encode() * 1000) for i in range(6)])
        winners = [i for i, (_, won) in enumerate(outcome) if won]
        assert len(winners) == 1, outcome
        assert open(path, "rb").read() == f"writer {winners[0]}".encode() * 1000
    assert sorted(os.listdir(tmp_path / "d")) == sorted(f"k{k}" for k in range(30))    # no temporary files left


def test_create_if_absent_modes(tmp_path, s3_bucket):
    url, opts = s3_bucket
    local, s3 = ObjectStore(str(tmp_path / "o")), ObjectStore(f"{url}/o", opts)
    assert (local.create_mode, s3.create_mode, ObjectStore("memory://m").create_mode) == (
        "link", "if-none-match", "check-then-write")
    for objects in (local, s3):
        assert objects.create("a/b.json", b"first") is True
        assert objects.create("a/b.json", b"second") is False
        assert objects.get("a/b.json") == b"first"


# --- real races -----------------------------------------------------------------------------------------------------
def test_racing_writers_with_identical_content_both_succeed(target):
    url, opts, objects = target
    utts = utterances()
    plan = plan_shards(utts, 256)
    data = labels(utts, 1)
    ref_url = url + "-ref"
    ref = new_store(ref_url, opts, plan)
    for sh in plan.shards:
        ref.write_shard(sh.index, shard_arrays(data, sh))

    new_store(url, opts, plan)
    writers = [open_store(url, mode="r+", storage_options=opts) for _ in range(2)]
    for sh in plan.shards:
        outcome = race([lambda w=w: w.write_shard(sh.index, shard_arrays(data, sh)) for w in writers])
        assert [k for k, _ in outcome] == ["ok", "ok"], outcome
        assert outcome[0][1] == outcome[1][1] == ref.shard_record(sh.index)
    assert verify_store(url, storage_options=opts) == []
    assert objects() == objects(ref_url)          # one record per shard, no claim left: the single writer's store


def test_racing_writers_with_different_content_one_wins(target):
    url, opts, objects = target
    utts = utterances()
    plan = plan_shards(utts, 256)
    a = labels(utts, 1)
    b = variant(a, plan)
    new_store(url, opts, plan)
    writers = [open_store(url, mode="r+", storage_options=opts) for _ in range(2)]
    winners = {}
    for sh in plan.shards:
        outcome = race([lambda w=w, d=d: w.write_shard(sh.index, shard_arrays(d, sh)) for w, d in zip(writers, (a, b))])
        kinds = [k for k, _ in outcome]
        assert sorted(kinds) == ["error", "ok"], outcome
        err = next(e for k, e in outcome if k == "error")
        assert isinstance(err, StoreError) and f"shard {sh.index} " in str(err)
        assert sh.utt_ids[0] in str(err) or "being written by another writer" in str(err)
        winners[sh.index] = (a, b)[kinds.index("ok")]
    assert verify_store(url, storage_options=opts) == []
    ro = open_store(url, storage_options=opts)
    for sh in plan.shards:
        for u in sh.utt_ids:
            assert np.array_equal(ro[u], winners[sh.index][u])
    assert not [k for k in objects() if k.startswith("claims/")]


def _write_all_shards(args):
    url, opts, seed, flip, start = args
    utts = utterances()
    plan = plan_shards(utts, 256)
    data = labels(utts, seed)
    if flip:
        data = variant(data, plan)
    st = open_store(url, mode="r+", storage_options=opts)
    start.wait()
    out = {}
    for sh in plan.shards:
        try:
            st.write_shard(sh.index, shard_arrays(data, sh))
            out[sh.index] = "ok"
        except StoreError as e:
            out[sh.index] = str(e)
    return out


def test_racing_processes_on_one_store(target):
    """Two jobs (spawned processes) write every shard of one store at once, one with other labels."""
    url, opts, objects = target
    utts = utterances()
    plan = plan_shards(utts, 256)
    new_store(url, opts, plan)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            res = pool.map(_write_all_shards, [(url, opts, 1, False, start), (url, opts, 1, True, start)])
    a = labels(utts, 1)
    b = variant(a, plan)
    ro = open_store(url, storage_options=opts)
    for sh in plan.shards:
        outcome = [r[sh.index] for r in res]
        assert outcome.count("ok") == 1, outcome
        loss = next(o for o in outcome if o != "ok")
        assert f"shard {sh.index} " in loss
        won = (a, b)[outcome.index("ok")]
        assert all(np.array_equal(ro[u], won[u]) for u in sh.utt_ids)
    assert verify_store(url, storage_options=opts) == []
    assert not [k for k in objects() if k.startswith("claims/")]


# --- forced interleavings -------------------------------------------------------------------------------------------
def hold_before(store, method, release, reached, key_prefix):
    """Make one writer's ObjectStore wait at `method` on keys starting with key_prefix until `release` is set (the
    real method then runs); `reached` is set when it gets there."""
    objects = store._handle().objects
    real = getattr(objects, method)

    def held(key, *args):
        if key.startswith(key_prefix):
            reached.set()
            assert release.wait(60)
        return real(key, *args)
    setattr(objects, method, held)


def test_loser_that_looked_before_the_winner_committed_leaves_it_untouched(target):
    """B finds no record, then stalls (a zombie); A writes the whole shard; B resumes with other labels."""
    url, opts, objects = target
    utts = utterances()
    plan = plan_shards(utts, 256)
    a = labels(utts, 1)
    b = variant(a, plan)
    sh = plan.shards[1]
    new_store(url, opts, plan)
    wa, wb = (open_store(url, mode="r+", storage_options=opts) for _ in range(2))
    release, reached = threading.Event(), threading.Event()
    hold_before(wb, "create", release, reached, "claims/")
    result = {}

    def run_b():
        try:
            result["b"] = wb.write_shard(sh.index, shard_arrays(b, sh))
        except StoreError as e:
            result["b"] = e
    t = threading.Thread(target=run_b)
    t.start()
    assert reached.wait(60)
    wa.write_shard(sh.index, shard_arrays(a, sh))
    before = objects()
    release.set()
    t.join()
    assert isinstance(result["b"], StoreError)
    msg = str(result["b"])
    assert f"shard {sh.index} is already complete with different content" in msg
    assert f"labels differ for 1 utterance(s): '{sh.utt_ids[0]}'" in msg
    assert objects() == before
    for other in plan.shards:
        if other.index != sh.index:
            wa.write_shard(other.index, shard_arrays(a, other))
    assert verify_store(url, storage_options=opts) == []
    ro = open_store(url, storage_options=opts)
    assert all(np.array_equal(ro[u], a[u]) for u in sh.utt_ids)


def test_writer_holding_the_claim_turns_away_a_different_writer(target):
    """A has claimed the shard and is writing its object; B (other failures) is refused at once; A completes."""
    url, opts, objects = target
    utts = utterances()
    plan = plan_shards(utts, 256)
    a = labels(utts, 1)
    sh = plan.shards[2]
    new_store(url, opts, plan)
    wa, wb = (open_store(url, mode="r+", storage_options=opts) for _ in range(2))
    release, reached = threading.Event(), threading.Event()
    hold_before(wa, "set", release, reached, shard_key("codes", sh.index))
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("a", wa.write_shard(sh.index, shard_arrays(a, sh))))
    t.start()
    assert reached.wait(60)
    failed = sh.utt_ids[1]
    with pytest.raises(StoreError, match=f"shard {sh.index} is being written by another writer") as err:
        wb.write_shard(sh.index, {u: a[u] for u in sh.utt_ids if u != failed}, failures={failed: "no audio"})
    assert f"written there, failed here: '{failed}'" in str(err.value)
    assert claim_key(sh.index) in str(err.value)
    release.set()
    t.join()
    assert done["a"]["failures"] == {}
    assert open_store(url, storage_options=opts).completed_shards() == {sh.index}
    assert not [k for k in objects() if k.startswith("claims/")]


CRASH_AFTER_CLAIM = """
import os, sys
sys.path.insert(0, {root!r})
from tests.test_store_concurrency import labels, shard_arrays, utterances
from ci_store import open_store
from ci_store.fsio import ObjectStore
ObjectStore.set = lambda self, key, data: os._exit(7)     # killed after claiming, before writing the shard object
st = open_store({url!r}, mode="r+")
st.write_shard({shard}, shard_arrays(labels(utterances(), 1), st.plan.shards[{shard}]))
"""


def test_a_crashed_claimant_blocks_only_different_content(tmp_path):
    """A writer killed after claiming leaves its claim: the same labels complete the shard (and remove the claim,
    giving the byte-identical store); other labels are refused with the claim to delete, and pass once it is gone."""
    utts = utterances()
    plan = plan_shards(utts, 256)
    a = labels(utts, 1)
    ref = new_store(str(tmp_path / "ref"), None, plan)
    for sh in plan.shards:
        ref.write_shard(sh.index, shard_arrays(a, sh))
    url = str(tmp_path / "s")
    st = new_store(url, None, plan)
    for s in (0, 1):
        proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_CLAIM.format(root=ROOT, url=url, shard=s)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 7, proc.stderr
        assert os.path.exists(os.path.join(url, claim_key(s))) and not st.is_shard_complete(s)

    b = variant(a, plan)
    with pytest.raises(StoreError, match="shard 0 is being written by another writer") as err:
        st.write_shard(0, shard_arrays(b, plan.shards[0]))
    assert f"delete {url}/{claim_key(0)}" in str(err.value) and f":{os.getpid()}:" not in str(err.value)
    for sh in plan.shards:                                     # the same labels: shards 0 and 1 complete too
        st.write_shard(sh.index, shard_arrays(a, sh))
    assert verify_store(url) == []
    assert local_objects(url) == local_objects(ref.url)

    url2 = str(tmp_path / "s2")
    st2 = new_store(url2, None, plan)
    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_CLAIM.format(root=ROOT, url=url2, shard=0)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 7, proc.stderr
    with pytest.raises(StoreError, match="being written by another writer"):
        st2.write_shard(0, shard_arrays(b, plan.shards[0]))
    os.remove(os.path.join(url2, claim_key(0)))                # what the message says to do
    st2.write_shard(0, shard_arrays(b, plan.shards[0]))
    assert np.array_equal(open_store(url2)[plan.shards[0].utt_ids[0]], b[plan.shards[0].utt_ids[0]])


def test_a_completed_shard_record_is_created_once(tmp_path):
    """The record itself is create-if-absent: a second record write of a complete shard never replaces it."""
    utts = utterances()
    plan = plan_shards(utts, 256)
    a = labels(utts, 1)
    st = new_store(str(tmp_path / "s"), None, plan)
    st.write_shard(0, shard_arrays(a, plan.shards[0]))
    path = os.path.join(st.url, done_key(0))
    before = open(path, "rb").read()
    assert st._handle().objects.create(done_key(0), b"{}") is False
    assert open(path, "rb").read() == before


def test_resume_removes_claims_left_next_to_complete_shards(tmp_path):
    """A writer that could not remove its claim after writing the record leaves it behind; reopening the store to
    resume removes it (the shard is complete, the claim protects nothing) and keeps claims of incomplete shards."""
    utts = utterances()
    plan = plan_shards(utts, 256)
    a = labels(utts, 1)
    ref = new_store(str(tmp_path / "ref"), None, plan)
    url = str(tmp_path / "s")
    st = new_store(url, None, plan)
    for sh in plan.shards:
        ref.write_shard(sh.index, shard_arrays(a, sh))
        if sh.index != 3:
            st.write_shard(sh.index, shard_arrays(a, sh))
    objects = st._handle().objects
    for s in (1, 3):
        assert objects.create(claim_key(s), b'{"left": "by a writer that lost its connection"}')
    again = create(url, plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=32, exist_ok=True)
    assert os.listdir(os.path.join(url, "claims")) == [os.path.basename(claim_key(3))]
    os.remove(os.path.join(url, claim_key(3)))
    again.write_shard(3, shard_arrays(a, plan.shards[3]))
    assert local_objects(url) == local_objects(ref.url)


def _write_one_shard(args):
    url, opts, shard, flip = args
    utts = utterances()
    plan = plan_shards(utts, 256)
    data = labels(utts, 1)
    if flip:
        data = variant(data, plan)
    open_store(url, mode="r+", storage_options=opts).write_shard(shard, shard_arrays(data, plan.shards[shard]))


def test_a_listing_cached_before_another_process_wrote_does_not_hide_its_record(s3_bucket):
    """A job lists the store (completed_shards) and later writes a shard that another process completed meanwhile
    with other labels: it must see that record (s3fs's listing cache would say it is missing) and refuse."""
    bucket, opts = s3_bucket
    url = f"{bucket}/store"
    utts = utterances()
    plan = plan_shards(utts, 256)
    new_store(url, opts, plan)
    late = open_store(url, mode="r+", storage_options=opts)
    assert late.completed_shards() == set()
    with mp.get_context("spawn").Pool(1) as pool:
        pool.map(_write_one_shard, [(url, opts, 0, False)])
    before = open_store(url, storage_options=opts)._handle().objects.get(shard_key("codes", 0))
    with pytest.raises(StoreError, match="shard 0 is already complete with different content"):
        late.write_shard(0, shard_arrays(variant(labels(utts, 1), plan), plan.shards[0]))
    assert late._handle().objects.get(shard_key("codes", 0)) == before
