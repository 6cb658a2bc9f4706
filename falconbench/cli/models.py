"""`falconbench models`: list what falconbench knows, and fetch the bundled real model."""

from __future__ import annotations

import click

from ..render.console import console, err_console

MODELS_FORMATS = ("table", "json")


@click.group("models")
def models_group():
    """List model profiles and bundled real models; convert a bundled model into a cached folder.

    \b
    Examples:
      falconbench models list
      falconbench models get smollm2
    """


@models_group.command("list")
@click.option("-f", "--format", "fmt", type=click.Choice(MODELS_FORMATS), default="table", show_default=True)
def list_command(fmt):
    """The bundled profiles (configs) and bundled real models, with whether each real model is cached."""
    from ..render import models as render
    from ..zoo import list_models

    rows = list_models()
    if fmt == "json":
        click.echo(render.models_json(rows))
    else:
        console().print(render.models_table(rows))


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
    from ..zoo import ensure_model, get_zoo_model

    model = get_zoo_model(name)
    announce_conversion(model.name)
    fetched = ensure_model(model.name)
    if fetched.converted:
        err_console().print(f"Converted in {fetched.seconds:.1f} s.")
    click.echo(str(fetched.folder))


def announce_conversion(name: str) -> None:
    """Say so before a bundled model is converted on its first use (it takes a while, once); `models get` and
    `run -m NAME` both convert."""
    from ..zoo import ZOO, cached_model_dir

    model = ZOO.get(name.strip().lower())
    if model is not None and cached_model_dir(model.name) is None:
        err_console().print(f"Converting {model.gguf_file} from the {model.distribution} package into a cached "
                            "folder (once; about 30 s on 2 cores)...", markup=False, highlight=False)
