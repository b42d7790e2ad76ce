"""Dask worker preload for the dead-worker test (not production code): a worker that embeds an utterance of
shard `CI_STORE_TEST_CRASH_SHARD` dies at once, as an OOM kill would, unless the marker file
`CI_STORE_TEST_CRASH_MARKER` exists; the first death creates the marker, so the retried task succeeds."""
import os


def dask_setup(worker):
    import distill.extract.job as job
    import distill.extract.shard_task as shard_task

    marker, shard = os.environ["CI_STORE_TEST_CRASH_MARKER"], int(os.environ["CI_STORE_TEST_CRASH_SHARD"])
    run_shard, embed = job.run_shard, shard_task.embed_batch

    def crashing_run_shard(cfg, shard_index, utts, float_shards=None):
        def embed_then_die(teacher, waves):
            out = embed(teacher, waves)
            if shard_index == shard and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(17)
            return out

        shard_task.embed_batch = embed_then_die
        try:
            return run_shard(cfg, shard_index, utts, float_shards)
        finally:
            shard_task.embed_batch = embed

    job.run_shard = crashing_run_shard
