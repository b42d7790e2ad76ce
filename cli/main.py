"""The `ci-store` console script: one click group; each command module registers itself here."""
import click

from cli.errors import DEBUG_ENV, ErrorHandlingGroup, epilog


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=epilog())
@click.version_option(package_name="ci-store")
@click.option("--debug", is_flag=True,
              help=f"Also print the Python traceback of errors reported as one `Error:` line (or set {DEBUG_ENV}=1).")
def main(debug):
    """ci-store: compress teacher labels for ASR knowledge distillation into codebook-index stores.

    Remote (s3://, gs://) format-v2 stores whose index exceeds 64 MiB copy it once per host into
    $CI_STORE_INDEX_CACHE (default ~/.cache/ci-store/index) and map it there; set CI_STORE_INDEX_CACHE=off to
    read the index by ranged requests instead, or to a directory to choose where the copy goes.
    """


def _register():
    # Each command lives in its own module; importing it attaches it to `main`.
    import importlib
    import pkgutil

    import cli as _pkg

    for mod in pkgutil.iter_modules(_pkg.__path__):
        if mod.name.startswith("cmd_"):
            importlib.import_module(f"cli.{mod.name}")


_register()
