"""The extraction job: corpus -> teacher -> codec -> CI store, one Dask task per shard.

- `planning`: exact frame counts and the shard layout (CI shards with float-label shards nested inside);
- `job`: the job's configuration and the driver that runs the shard tasks on Dask, resumably;
- `shard_task`: one shard task (prefetched audio, teacher, on-device encoding, float sub-shards, retries);
- `checkpoints`: the codes of finished segments of an unfinished shard, so a pre-empted task resumes there;
- `cluster`: devices, the clusters the job starts (embedded CPU or one-worker-per-GPU, dask-jobqueue batch jobs)
  and per-worker tuning;
- `frames`: a seeded sample of teacher frames for training the quantizer.
"""
from distill.extract.cluster import (JOBQUEUE_CLUSTERS, LEAN_DASK_CONFIG, check_device, embedded_cluster,
                                     embedded_gpu_cluster, jobqueue_cluster, parse_device)
from distill.extract.frames import sample_frames
from distill.extract.job import (DEFAULT_SHARD_FRAMES, ExtractionConfig, ExtractionReport, ShardResult,
                                 embed_utterance, prepare, run_extraction, run_shard)
from distill.extract.planning import ExtractionError, check_unique_ids, frame_counts, plan_stores

__all__ = ["DEFAULT_SHARD_FRAMES", "ExtractionConfig", "ExtractionError", "ExtractionReport", "ShardResult",
           "JOBQUEUE_CLUSTERS", "LEAN_DASK_CONFIG", "check_device", "check_unique_ids", "embed_utterance",
           "embedded_cluster", "embedded_gpu_cluster", "frame_counts", "jobqueue_cluster", "parse_device",
           "plan_stores", "prepare", "run_extraction", "run_shard", "sample_frames"]
