"""Reading and writing lhotse CutSets for the interop commands, with errors that name the file."""
from __future__ import annotations

import os

from ci_store.errors import duplicate_ids, name_some

from . import InteropError


def read_cuts(path) -> list:
    """All cuts of a lhotse CutSet manifest (any format lhotse reads); duplicate ids refused."""
    from lhotse import CutSet
    from lhotse.cut import Cut

    try:
        cuts = list(CutSet.from_file(path))
    except FileNotFoundError:
        raise InteropError(f"{path}: no such cut manifest") from None
    except Exception as e:  # lhotse raises ValueError/KeyError/JSON errors for non-cut manifests
        raise InteropError(f"{path}: not a lhotse CutSet ({type(e).__name__}: {e})") from None
    not_cuts = [type(c).__name__ for c in cuts if not isinstance(c, Cut)]
    if not_cuts:
        raise InteropError(f"{path}: not a lhotse CutSet (holds {not_cuts[0]} items)")
    dups = duplicate_ids(c.id for c in cuts)
    if dups:
        raise InteropError(f"{path}: duplicate cut ids {name_some(dups)}")
    return cuts


def write_cuts(cuts, path) -> None:
    """Write a CutSet manifest (lhotse picks the format from the name, e.g. .jsonl.gz); local folders are made."""
    from lhotse import CutSet

    from ci_store.fsio import is_local, local_path
    if is_local(str(path)):
        os.makedirs(os.path.dirname(os.path.abspath(local_path(str(path)))), exist_ok=True)
    CutSet.from_cuts(cuts).to_file(path)
