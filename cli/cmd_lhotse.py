"""`ci-store attach | import-lhotse | export-lhotse`: a store in lhotse/icefall recipes; CIs migrated in and out."""
from __future__ import annotations

import json

import click

from cli.main import main
from cli.options import json_object

storage_options_opt = click.option("--storage-options", "storage_options", default=None, metavar="JSON",
                                   help="fsspec storage options for the store, as a JSON object.")
field_opt = click.option("--field", default="codebook_indexes", show_default=True,
                         help="Custom cut field holding the codebook indexes (icefall: codebook_indexes).")
tolerance_opt = click.option("--tolerance-frames", default=2, show_default=True, type=click.IntRange(min=0),
                             help="Frames a cut's labels may differ from its duration x frame rate.")


def _report_failed(failed: dict, what: str) -> None:
    if failed:
        click.echo(f"{len(failed)} cuts have no labels (failed extraction) and were {what}:", err=True)
        for cid, reason in sorted(failed.items())[:20]:
            click.echo(f"  {cid}: {reason}", err=True)
        if len(failed) > 20:
            click.echo(f"  ... ({len(failed) - 20} more)", err=True)


@main.command("attach")
@click.argument("cuts")
@click.argument("store")
@field_opt
@click.option("--out", "out", required=True, help="CutSet to write (e.g. cuts_with_ci.jsonl.gz).")
@tolerance_opt
@storage_options_opt
def attach_cmd(cuts, store, field, out, tolerance_frames, storage_options):
    """Write CUTS with FIELD of each cut pointing into STORE (lhotse storage_type "ci_store").

    A recipe then reads the codes with its unchanged collate_custom_field(cuts, FIELD) after
    `import distill.interop.lhotse_backend`. Cuts whose extraction failed are left out and listed.
    """
    from distill.interop.cutsets import read_cuts, write_cuts
    from distill.interop.lhotse_backend import attach_store
    opts = json_object(storage_options, "--storage-options") or None
    cs = read_cuts(cuts)
    attached, failed = attach_store(cs, store, field=field, storage_options=opts,
                            tolerance_frames=tolerance_frames)
    write_cuts(attached, out)
    _report_failed(failed, "left out")
    click.echo(f"{out}: {len(attached)} cuts with {field!r} from {store}")


@main.command("import-lhotse")
@click.argument("cuts")
@field_opt
@click.option("--out", "out", required=True, help="Store URL to create (local path or fsspec URL).")
@click.option("--quantizer", default=None,
              help="Quantizer to keep in the store: a multi_quantization state dict (torch.save, loaded with "
                   "weights_only=True) or a ci-store .safetensors quantizer.")
@click.option("--codebook-size", type=int, default=None, help="Entries per codebook (default: the quantizer's, "
                                                               "else 256).")
@click.option("--shard-frames", type=int, default=None, help="Frames per shard (default 2**20).")
@click.option("--teacher", default=None, metavar="JSON", help="Teacher description to record, as a JSON object.")
@click.option("--resume", is_flag=True, help="Continue an interrupted import into the same store.")
@tolerance_opt
@storage_options_opt
def import_cmd(cuts, field, out, quantizer, codebook_size, shard_frames, teacher, resume, tolerance_frames,
               storage_options):
    """Copy the CIs of CUTS (any lhotse storage: HDF5, .npy files, ...) into a new sharded store, verified."""
    from distill.codec.reference import load_quantizer_file
    from distill.interop.cutsets import read_cuts
    from distill.interop.migrate import import_lhotse
    opts = json_object(storage_options, "--storage-options") or None
    q = load_quantizer_file(quantizer) if quantizer else None
    cs = read_cuts(cuts)
    summary = import_lhotse(cs, out, field=field, quantizer=q, codebook_size=codebook_size,
                   shard_frames=shard_frames, storage_options=opts,
                   teacher=json_object(teacher, "--teacher") or None, exist_ok=resume,
                   tolerance_frames=tolerance_frames, source=str(cuts))
    click.echo(json.dumps(summary, indent=1))


@main.command("export-lhotse")
@click.argument("store")
@click.argument("cuts")
@click.option("--storage-path", required=True,
              help="Where the lhotse writer puts the arrays (HDF5 file or .npy directory); must not exist.")
@click.option("--storage-type", type=click.Choice(["numpy_hdf5", "numpy_files"]), default="numpy_hdf5",
              show_default=True, help="lhotse writer (lossless ones only).")
@field_opt
@click.option("--out", "out", required=True, help="CutSet to write, with FIELD pointing at the new storage.")
@storage_options_opt
def export_cmd(store, cuts, storage_path, storage_type, field, out, storage_options):
    """Write STORE's labels for CUTS with a plain lhotse writer, for recipes that must use lhotse storage."""
    from distill.interop.cutsets import read_cuts, write_cuts
    from distill.interop.migrate import export_lhotse
    opts = json_object(storage_options, "--storage-options") or None
    cs = read_cuts(cuts)
    exported, failed = export_lhotse(store, cs, storage_path, field=field, storage_type=storage_type,
                            storage_options=opts)
    write_cuts(exported, out)
    _report_failed(failed, "left out")
    click.echo(f"{out}: {len(exported)} cuts with {field!r} in {storage_type} {storage_path}")
