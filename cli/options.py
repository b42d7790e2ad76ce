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


def device_option(cuda_hint: str = "the default GPU"):
    """A click callback for --device: cpu, cuda or cuda:N (the form only; whether this machine has it is checked
    where it must be, with `usable_device`)."""

    def check(ctx, param, value):
        from distill.devices import DeviceError, parse_device

        try:
            parse_device(value, cuda_hint=cuda_hint)
        except DeviceError as e:
            raise click.BadParameter(str(e)) from None
        return value

    return check


def usable_device(device: str, cuda_hint: str = "the default GPU", dtype: str | None = None) -> None:
    """A --device this machine cannot compute on (or a --dtype it cannot autocast to there) is a bad option value
    (exit 2), refused before any work."""
    from distill.devices import DeviceError, check_device, check_dtype

    try:
        check_device(device, cuda_hint=cuda_hint)
    except DeviceError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if dtype is not None:
        try:
            check_dtype(dtype, device)
        except DeviceError as e:
            raise click.BadParameter(str(e), param_hint="--dtype") from None
