"""Interoperability with lhotse/icefall: a lhotse storage backend for ci-stores, and migration in and out.

- `lhotse_backend`: the `ci_store` FeaturesReader (import it to register it) and `attach_store`, which points a
  CutSet's custom field into a store so `collate_custom_field` / `cut.load_custom` read from it;
- `migrate`: `import_lhotse` (CIs in any lhotse storage -> a sharded store, verified) and `export_lhotse`
  (store -> a lossless lhotse writer).

lhotse is imported lazily by each module, not here, so `import distill` stays light.
"""


class InteropError(ValueError):
    """Cuts, fields or stores that cannot be attached, imported or exported; the message names the item."""


__all__ = ["InteropError"]
