"""The MVQ codec: a multi-codebook quantizer trained on teacher frames; frames -> uint8/uint16 codes -> frames.

- `quantizer`: the model (pre-transform, codebooks), encode/decode, safetensors save/load;
- `search`: the code search (beam + ICM over fixed pairwise tables), shared by encoding and training;
- `training`: k-means initialisation and least-squares codebook updates;
- `malloc_tuning`: glibc thresholds that keep the search's large temporaries out of mmap/munmap.
"""
from distill.codec.quantizer import (MultiCodebookQuantizer, QuantizerError, codebook_usage_entropy,
                                     relative_reconstruction_error)

__all__ = ["MultiCodebookQuantizer", "QuantizerError", "codebook_usage_entropy", "relative_reconstruction_error"]
