"""Storage for knowledge-distillation labels: sharded, self-describing Zarr v3 stores of codebook indexes (and float labels for comparison). No model code lives here.

    plan = plan_shards([(utt_id, num_frames), ...], shard_frames)
    store = create(url, plan, num_codebooks=16, frame_rate=50.0, quantizer=..., teacher=...)
    store.write_shard(i, {utt_id: codes, ...})          # one task per shard, any order, resumable
    store = open_store(url); codes = store[utt_id]      # local path, file://, memory://, s3://, gs://, caching URLs
"""
from .errors import StoreError
from .format import FORMAT_NAME, FORMAT_VERSION, codes_dtype, default_shard_frames
from .index import UtteranceIndex
from .plan import Shard, ShardPlan, plan_arrays, plan_shards
from .quantizer import arrays_sha256
from .store import CIStore, create, open_store

__all__ = ["StoreError", "FORMAT_NAME", "FORMAT_VERSION", "codes_dtype", "default_shard_frames", "UtteranceIndex",
           "Shard", "ShardPlan", "plan_shards", "plan_arrays", "arrays_sha256", "CIStore", "create", "open_store"]
