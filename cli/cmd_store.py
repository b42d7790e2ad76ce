"""`ci-store inspect | verify | compare`: look at, check and size label stores (thin wrappers over ci_store)."""
from __future__ import annotations

import json
import sys

import click

from cli.main import main
from cli.options import json_object


def _options(text: str | None) -> dict | None:
    return json_object(text, "--storage-options") or None


def _open(url: str, options: dict | None):
    from ci_store import open_store
    return open_store(url, storage_options=options)  # StoreError: `Error: ...`, exit 3 (cli.errors)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


storage_options_opt = click.option("--storage-options", "storage_options", default=None, metavar="JSON",
                                   help="fsspec storage options as a JSON object (e.g. endpoint_url, key, secret).")


@main.command("inspect")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--entropy-frames", default=100_000, show_default=True,
              help="Frames sampled for per-codebook usage entropy (0 to skip).")
@click.option("--dim", type=int, default=None, help="Teacher dim for the float32 ratio when the store lacks it.")
@storage_options_opt
def inspect_cmd(url, as_json, entropy_frames, dim, storage_options):
    """Summarise a store: utterances, frames, hours, bytes on storage, shards, failures, teacher, quantizer."""
    from ci_store.stats import summarize
    st = _open(url, _options(storage_options))
    s = summarize(st, entropy_frames=entropy_frames, dim=dim)
    if as_json:
        click.echo(json.dumps(s, indent=1, sort_keys=True))
        return
    kind = (f"codes: {s['num_codebooks']} codebooks x {s['codebook_size']} entries ({s['dtype']})"
            if s["kind"] == "codes" else f"float labels: dim {s['width']} ({s['dtype']})")
    lines = [
        f"store          {s['url']}  (ci-store format v{s['format_version']}, {s['created_by']})",
        f"kind           {kind}",
        f"utterances     {s['utterances']}",
        f"frames         {s['frames']}  ({s['hours']:.3f} h at {s['frame_rate']:g} Hz)",
        f"storage        {_size(s['bytes'])}  ({s['bytes']} bytes, {s['bytes_per_frame']:.3f} bytes/frame)",
        f"shards         {s['shards_complete']}/{s['shards_total']} complete  "
        f"({s['shard_frames']} frames/shard, {s['chunk_frames']} frames/chunk, {s['compressor']})",
        f"failures       {s['failures']}",
    ]
    if s.get("ratio_vs_float32"):
        lines.append(f"vs float32     {s['ratio_vs_float32']:.1f}x smaller than {s['dim']}-dim float32 "
                     f"({_size(s['float32_bytes'])})")
    t = s["teacher"] or {}
    lines.append("teacher        " + (", ".join(f"{k}={v}" for k, v in t.items()) if t else "(not recorded)"))
    q = s["quantizer"]
    lines.append("quantizer      " + (f"id={q['id']} sha256={q['sha256'][:16]}... arrays="
                                      f"{', '.join(f'{k}{v}' for k, v in q['arrays'].items())}" if q else "(none)"))
    ent = s.get("codebook_entropy_bits")
    if ent:
        lines.append(f"usage entropy  (bits, max {s['max_entropy_bits']:g}) " + " ".join(f"{e:.2f}" for e in ent))
    click.echo("\n".join(lines))


@main.command("verify")
@click.argument("url")
@click.option("--no-data", is_flag=True, help="Check layout and completion records only; skip reading shards.")
@click.option("--json", "as_json", is_flag=True, help="Print {ok, problems} as JSON.")
@storage_options_opt
def verify_cmd(url, no_data, as_json, storage_options):
    """Check a store: all shards complete, index consistent, checksums, values, quantizer. Exit 1 on problems."""
    from ci_store.verify import verify_store
    problems = verify_store(url, storage_options=_options(storage_options), check_data=not no_data)
    if as_json:
        click.echo(json.dumps({"url": url, "ok": not problems, "problems": problems}, indent=1))
    elif problems:
        click.echo(f"{url}: {len(problems)} problem(s)", err=True)
        for p in problems:
            click.echo(f"  - {p}", err=True)
    else:
        click.echo(f"{url}: OK")
    if problems:
        sys.exit(1)


@main.command("compare")
@click.argument("urls", nargs=-1, required=True)
@click.option("--dim", type=int, default=None,
              help="Teacher dim for the float32 baseline when a codes store records none.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@storage_options_opt
def compare_cmd(urls, dim, as_json, storage_options):
    """Bytes, bytes/frame and ratio vs float32 (frames x dim x 4) for stores of the same utterances."""
    from ci_store.stats import compare_rows
    opts = _options(storage_options)
    rows = compare_rows([_open(u, opts) for u in urls], dim=dim)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    head = (f"{'store':<40} {'labels':<14} {'frames':>10} {'bytes':>12} {'B/frame':>10} {'vs float32':>11} "
            f"{'quantizer B':>12} {'B/frame w/o q':>13} {'vs f32 w/o q':>12}")
    click.echo(head)
    click.echo("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio_vs_float32']:.1f}x" if r["ratio_vs_float32"] else "n/a"
        lratio = f"{r['label_ratio_vs_float32']:.1f}x" if r["label_ratio_vs_float32"] else "n/a"
        name = r["url"] if len(r["url"]) <= 40 else "..." + r["url"][-37:]
        click.echo(f"{name:<40} {r['label']:<14} {r['frames']:>10} {r['bytes']:>12} "
                   f"{r['bytes_per_frame']:>10.3f} {ratio:>11} {r['quantizer_bytes']:>12} "
                   f"{r['label_bytes_per_frame']:>13.3f} {lratio:>12}")
    if any(r["quantizer_bytes"] for r in rows):
        click.echo("(the quantizer stored inside a CI store is a fixed cost: 'w/o q' columns leave it out, the "
                   "others include it)")
    if not all(r["same_utterances"] for r in rows):
        click.echo("warning: the stores do not hold the same utterances (ids / frame counts differ)", err=True)
    if any(r["ratio_vs_float32"] is None for r in rows):
        click.echo("note: pass --dim for codes stores that record no teacher dim", err=True)
