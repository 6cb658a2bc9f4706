"""Resolving `--model` to a config.json: a bundled profile, a folder, a file, or a hub id in the local cache.

Nothing here touches the network: a hub id is looked up in the Hugging Face cache on disk only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelNotFoundError, UnknownModelError, did_you_mean
from .spec import ArchSpec, spec_from_config


def profiles_dir() -> Path:
    """The bundled `profiles/` folder (`falconbench/profiles` links to it, so it also ships in the wheel)."""
    return Path(__file__).resolve().parent / "profiles"


def model_profiles() -> list[str]:
    """Names of the bundled model profiles."""
    root = profiles_dir() / "models"
    return sorted(p.parent.name for p in root.glob("*/config.json"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its display name, the folder that holds config.json (and maybe weights), the config."""

    name: str
    folder: Path
    config_path: Path
    config: dict[str, Any]
    kind: str  # "profile" | "folder" | "file" | "hub-cache"

    def spec(self) -> ArchSpec:
        return spec_from_config(self.config, name=self.name, source=str(self.config_path))

    @property
    def config_sha256(self) -> str:
        """The SHA-256 of the config's contents (key order aside): `run` records it in each row's model_source, so
        `report` and `fit --calibrate` can tell the measured config from another of the same name."""
        return config_digest(self.config)


def config_digest(config: dict[str, Any]) -> str:
    """The SHA-256 of a config's contents, key order aside."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few KiB; the largest seen (with tokenizer tables) under 1 MiB
MAX_CONFIG_DIGITS = 40  # no count in a config has more digits (10^40 parameters); int() would take 4,300


class OversizedInt(str):
    """The digits of an integer too long to be a real config value, kept so its field can be named."""


def read_config(path: Path) -> dict[str, Any]:
    """Parse a config.json, with the path and position in the error when it is malformed; integers of more than
    MAX_CONFIG_DIGITS digits and nesting too deep to parse are refused with the field's name."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {path.stat().st_size:,} bytes, more than a config.json holds (at most "
                              f"{MAX_CONFIG_BYTES // 2**20} MiB). Pass the model's config.json")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}. Check the path and its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}). Pass a JSON config.json") from None
    try:
        config = json.loads(text, parse_int=lambda digits: OversizedInt(digits) if len(digits) > MAX_CONFIG_DIGITS
                            else int(digits))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                          "Fix the file or pass another config.json") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config.json. Pass the model's config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(config).__name__}")
    oversized = find_oversized(config)
    if oversized is not None:
        field, digits = oversized
        raise ConfigError(f"{path}: {field} is an integer of {len(digits):,} digits; no config value has more than "
                          f"{MAX_CONFIG_DIGITS}. Fix the field or pass another config.json")
    return config


def find_oversized(config: Any) -> tuple[str, str] | None:
    """The dotted path and digits of the first OversizedInt in a parsed config (iterative: nesting may be deep)."""
    stack: list[tuple[str, Any]] = [("", config)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, OversizedInt):
            return where or "the value", str(value)
        if isinstance(value, dict):
            stack.extend((f"{where}.{key}" if where else str(key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in reversed(list(enumerate(value))))
    return None


def hub_cache_dirs() -> list[Path]:
    """The Hugging Face hub cache folders, in the order huggingface_hub itself consults them."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]) / "hub"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    return [Path(xdg) / "huggingface" / "hub" if xdg else Path.home() / ".cache" / "huggingface" / "hub"]


def find_in_hub_cache(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local cache (the `main` ref if recorded), or None."""
    for cache in hub_cache_dirs():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file():
            snapshot = snapshots / ref.read_text().strip()
            if (snapshot / "config.json").is_file():
                return snapshot
        candidates = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()),
                            key=lambda p: p.stat().st_mtime, reverse=True)
        if candidates:
            return candidates[0]
    return None


def bundled_model(name: str) -> ModelSource | None:
    """A model that ships inside a package (`falconbench models list`): its converted folder once `run` or
    `models get` made it, else the config.json that conversion writes, shipped in falconbench/data/zoo/."""
    from .zoo import ZOO, cached_model_dir

    if name not in ZOO:
        return None
    folder = cached_model_dir(name)
    if folder is not None:
        return ModelSource(name, folder, folder / "config.json", read_config(folder / "config.json"), "bundled")
    shipped = Path(__file__).resolve().parent / "data" / "zoo" / f"{name}.json"
    return ModelSource(name, shipped.parent, shipped, read_config(shipped), "bundled")


def resolve_model(model: str) -> ModelSource:
    """Find `model`: a profile name, a folder with config.json, a config.json path, or a cached hub id."""
    text = model.strip()
    if not text:
        raise ModelNotFoundError("empty --model. Give a profile name such as falcon-7b, or a path")
    profile = profiles_dir() / "models" / text.lower() / "config.json"
    if "/" not in text and profile.is_file():
        return ModelSource(text.lower(), profile.parent, profile, read_config(profile), "profile")
    bundled = bundled_model(text.lower())
    if bundled is not None:
        return bundled
    path = Path(text).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError):  # a name too long, or with bytes no file system takes
        is_dir = is_file = False
    if is_dir:
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(f"{path} is a folder without a config.json. Point --model at a model folder")
        return ModelSource(path.resolve().name, path, config_path, read_config(config_path), "folder")
    if is_file:
        return ModelSource(path.resolve().parent.name if path.name == "config.json" else path.stem,
                           path.parent, path, read_config(path), "file")
    hub_like = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if hub_like:
        snapshot = find_in_hub_cache(text)
        if snapshot is not None:
            config_path = snapshot / "config.json"
            return ModelSource(text, snapshot, config_path, read_config(config_path), "hub-cache")
    raise model_not_found(text, hub_like)


def model_not_found(text: str, hub_like: bool) -> ModelNotFoundError:
    """The error for a --model that resolves to nothing: a missing path, an uncached hub id, or an unknown name
    (with the nearest known names)."""
    if hub_like:
        return ModelNotFoundError(
            f"{text!r} is neither a folder here nor a hub id in the local Hugging Face cache. Pass a model folder, "
            "or fetch the hub id first (falconbench run --allow-downloads fetches its config, weights and tokenizer)")
    if text.startswith((".", "/", "~")) or "/" in text or os.sep in text or text.endswith(".json"):
        return ModelNotFoundError(f"{text}: no such file or folder. Check the path; --model takes a folder holding "
                                  "config.json, a config.json path, a profile name or a cached hub id")
    from .zoo import ZOO  # noqa: PLC0415 - bundled real models resolve too (by their converted config)

    known = model_profiles() + [name for name in ZOO if name not in model_profiles()]
    return UnknownModelError(
        f"unknown model {text!r}.{did_you_mean(text, known)} Known: {', '.join(known)}. Or pass a folder holding "
        "config.json, a config.json path, or a hub id in the local Hugging Face cache")
