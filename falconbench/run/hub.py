"""A hub id that is not in the local Hugging Face cache: refused, or fetched when the user passed --allow-downloads.

Only the files a run reads are fetched (config, safetensors weights, tokenizer); pickle-based weights and the
model's own Python code only when --allow-pickle or --trust-remote-code say so, and no weights at all for
--random-weights.
"""

from __future__ import annotations

from ..errors import ModelNotFoundError
from ..sources import ModelSource, hub_cache_dirs, resolve_model

CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                      "chat_template*")
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json")  # torch.load files: fetched only with --allow-pickle
CODE_PATTERNS = ("*.py",)  # a model's own code: fetched only with --trust-remote-code


def looks_like_hub_id(model: str) -> bool:
    """`owner/name`, as opposed to a path (./x, /x, ~/x) or a profile name."""
    text = model.strip()
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def download_patterns(random_weights: bool = False, allow_pickle: bool = False,
                      trust_remote_code: bool = False) -> list[str]:
    """The files of a repository that a run with these permissions reads."""
    patterns = list(CONFIG_FILES)
    if not random_weights:
        patterns += [*WEIGHT_PATTERNS, *TOKENIZER_PATTERNS, *(PICKLE_PATTERNS if allow_pickle else ())]
    return patterns + list(CODE_PATTERNS if trust_remote_code else ())


def resolve_or_download(model: str, allow_downloads: bool = False, random_weights: bool = False,
                        allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """`resolve_model`, and for a hub id missing from the cache: refuse (offline by default) or fetch it."""
    try:
        return resolve_model(model)
    except ModelNotFoundError:
        if not looks_like_hub_id(model):
            raise
        if not allow_downloads:
            raise ModelNotFoundError(
                f"{model.strip()} is not in the local Hugging Face cache ({hub_cache_dirs()[0]}), and falconbench "
                "run stays offline unless told otherwise. Pass --allow-downloads to fetch its config, safetensors "
                "weights and tokenizer into that cache (pickle weights and code only with --allow-pickle and "
                "--trust-remote-code), or download it yourself first") from None
    download(model.strip(), download_patterns(random_weights, allow_pickle, trust_remote_code))
    try:
        return resolve_model(model)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"{model.strip()} was downloaded but holds no config.json, so it is not a "
                                 "transformers model. Check the id") from None


def download(repo_id: str, patterns: list[str]) -> None:
    """Fetch `patterns` of `repo_id` into the cache `resolve_model` reads; any failure is one line."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError("--allow-downloads needs huggingface_hub: pip install huggingface_hub") from None
    failures: tuple[type[BaseException], ...] = (OSError, ValueError)
    try:
        import httpx  # huggingface_hub's transport: its connection errors are not OSError

        failures += (httpx.HTTPError,)
    except ImportError:
        pass
    try:
        snapshot_download(repo_id, cache_dir=str(hub_cache_dirs()[0]), allow_patterns=patterns)
    except failures as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelNotFoundError(f"could not download {repo_id} from the Hugging Face hub ({reason}). Check the "
                                 "id and the network, and log in (hf auth login) for a gated model") from None
