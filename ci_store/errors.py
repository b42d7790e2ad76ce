"""The one exception type callers catch for store-level problems (bad plan, bad path, incomplete or corrupt data).

Per-item input mistakes use the builtin types callers expect: KeyError for an unknown utterance id,
ValueError for an array with the wrong shape, dtype or values.
"""


class StoreError(Exception):
    """A store cannot be created, opened, written or read as asked; the message names the item at fault."""


def name_some(items, limit: int = 10) -> str:
    """Render up to `limit` offending items for an error message, with a count of the rest."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


def duplicate_ids(ids) -> list[str]:
    """Ids that occur more than once, each listed once, in order of first repeat."""
    seen: set = set()
    dups: dict = {}
    for i in ids:
        if i in seen:
            dups[i] = None
        seen.add(i)
    return list(dups)
