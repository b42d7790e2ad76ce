"""Option parsing shared by the commands (kept out of the command modules so they do not import each other)."""
from __future__ import annotations

import json

import click


def json_object(value: str | None, param_hint: str | None = None) -> dict:
    """A JSON object given on the command line ({} when absent); a clear usage error otherwise."""
    if not value:
        return {}
    try:
        out = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint=param_hint) from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object", param_hint=param_hint)
    return out
