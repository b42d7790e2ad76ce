"""Shared option parsing, and every command module importable on its own (no import cycle between them)."""
import pkgutil
import subprocess
import sys

import click
import pytest

import cli
from cli.options import json_object


@pytest.mark.parametrize("mod", sorted(m.name for m in pkgutil.iter_modules(cli.__path__) if m.name.startswith("cmd_")))
def test_command_module_imports_alone(mod):
    res = subprocess.run([sys.executable, "-c", f"import cli.{mod}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_json_object():
    assert json_object(None) == {} and json_object("") == {}
    assert json_object('{"anon": false, "client_kwargs": {"region_name": "eu-west-1"}}')["anon"] is False
    with pytest.raises(click.BadParameter, match="not valid JSON"):
        json_object("{anon: false}", "--storage-options")
    with pytest.raises(click.BadParameter, match="must be a JSON object"):
        json_object("[1, 2]", "--student")
