"""Storage for knowledge-distillation labels: sharded, self-describing Zarr v3 stores of codebook indexes (and float labels for comparison). No model code lives here."""
