"""`falconbench models`: list what falconbench knows, and fetch the bundled real model."""

from __future__ import annotations

import click

from ..render.console import console, err_console
from .options import format_option


@click.group("models")
def models_group():
    """List model profiles and bundled real models; convert a bundled model into a cached folder.

    \b
    Examples:
      falconbench models list
      falconbench models get smollm2
    """


@models_group.command("list")
@format_option()
def list_command(fmt):
    """The bundled profiles (configs) and bundled real models, with whether each real model is cached."""
    from ..render import models as render
    from ..zoo import list_models

    rows = list_models()
    if fmt == "table":
        console().print(render.models_table(rows))
    else:
        click.echo(render.FORMATTERS[fmt](rows), nl=fmt == "json")


@models_group.command("get")
@click.argument("name")
def get_command(name):
    """Convert bundled model NAME into a cached safetensors folder (once) and print the folder.

    The folder works wherever a model folder does, e.g. `falconbench run -m "$(falconbench models get smollm2)"`.
    Set FALCONBENCH_CACHE to keep the cache elsewhere than ~/.cache/falconbench.

    \b
    Example:
      falconbench models get smollm2
    """
    from ..zoo import get_zoo_model

    click.echo(str(convert_bundled(get_zoo_model(name).name)))


def convert_bundled(name: str):
    """The cached folder of bundled model `name`, converted first (once) under one status line, the library's
    own output going to the folder's conversion.log; None when `name` is no bundled model."""
    from ..zoo import CONVERSION_LOG, ZOO, cached_model_dir, ensure_model

    model = ZOO.get(name.strip().lower())
    if model is None:
        return None
    if cached_model_dir(model.name) is not None:
        return cached_model_dir(model.name)
    out = err_console()
    message = (f"Converting {model.gguf_file} from the {model.distribution} package into a cached folder (once; "
               "about 30 s on 2 idle cores)")
    if out.is_terminal:
        with out.status(message + "..."):
            fetched = ensure_model(model.name)
    else:
        out.print(message + "...", markup=False, highlight=False, soft_wrap=True)
        fetched = ensure_model(model.name)
    out.print(f"Converted in {fetched.seconds:.1f} s into {fetched.folder} (the libraries' output: "
              f"{CONVERSION_LOG} there).", markup=False, highlight=False, soft_wrap=True)
    return fetched.folder
