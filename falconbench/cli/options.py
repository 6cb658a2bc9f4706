"""The one vocabulary of options: each shared option is declared here once, and `plan`, `fit` and `run` take it.

Lists are comma-separated and may also repeat (`-d bf16,int8 -d nf4`); token counts and batches take a k suffix
(`8k` = 8192). Each parser raises a UsageError whose example is for the option that was wrong.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import click

from .. import api
from ..errors import UsageError, did_you_mean
from ..placement import DEVICE_MAPS
from ..planner import ATTN_IMPLS, DEVICES
from ..render.console import FORMATS
from ..schemes import DEFAULT_DTYPES, KV_DTYPE_AUTO, KV_DTYPES, SCHEMES

# NOTE: cuda everywhere: plan and fit size a GPU, and `run` on a machine without one says to pass --device cpu
# rather than quietly measuring the CPU.
DEFAULT_DEVICE = "cuda"
DEFAULT_ATTN = "sdpa"
# NOTE: "auto" is the cache transformers allocates: the scheme's compute dtype (fp32 for fp32, 16-bit otherwise);
# plan and fit default to it so their KV bytes are those `run` measures.
KV_DTYPE_CHOICES: tuple[str, ...] = (KV_DTYPE_AUTO, *KV_DTYPES)
DEFAULT_CONTEXT = 2048
DEFAULT_BATCH = 1


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """`-d bf16,int8 -d nf4` → ["bf16", "int8", "nf4"], order kept, duplicates dropped."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    items: list[str] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if item and item not in items:
                items.append(item)
    return items


def parse_count(text: str, option: str, example: str) -> int:
    """A positive whole number of tokens or sequences: `2048`, `8k`, `32K`, `1m` (one rule, the API's)."""
    return api.parse_count(text, f"--{option}", f"--{option} {example}")


class Whole(click.ParamType):
    """A whole number of runs, 0 or more, in the digits 0-9 (click's INT reads other scripts' digits too)."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()) or len(text) > api.MAX_DIGITS:
            self.fail(f"must be a whole number written with the digits 0-9, got {str(value)[:40]!r}", param, ctx)
        return int(text)


WHOLE = Whole()


def given_list(option: str, values: Iterable[str] | str | None, example: str) -> list[str]:
    """split_list, refusing a value that was given but names nothing (`-b ""`, `-m ,`)."""
    items = split_list(values)
    if values and not items:
        raise UsageError(f"--{option} was given an empty value. Example: --{option} {example}")
    return items


def count_list(option: str, values: Iterable[str] | str | None, example: str) -> list[int]:
    """Positive counts from comma lists (duplicates dropped, order kept)."""
    out: list[int] = []
    for item in given_list(option, values, example):
        number = parse_count(item, option, example)
        if number not in out:
            out.append(number)
    return out


# Each count option's example, so an error shows a value that fits the option that was wrong.
COUNT_EXAMPLES = {"context": "2048,8k", "batch": "1,8", "prompt-tokens": "128,1k", "new-tokens": "32,128",
                  "eval-tokens": "2k", "window": "1k", "stride": "512"}


class Count(click.ParamType):
    """One token count or number of runs, with the k suffix: `--window 1k`."""

    name = "N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        option = param.name.replace("_", "-") if param is not None else "value"
        return parse_count(value, option, COUNT_EXAMPLES.get(option, "1k"))


COUNT = Count()


def _counts(option: str, default: int) -> Callable:
    def callback(ctx, param, values):
        return count_list(option, values, COUNT_EXAMPLES.get(option, "1,8")) or [default]
    return callback


def _names(example: str) -> Callable:
    def callback(ctx, param, values):
        return given_list(param.name.removesuffix("s"), values, example)
    return callback


def model_option(help: str, required: bool = False) -> Callable:
    """-m/--model: one or more models, comma-separated or repeated."""
    return click.option("-m", "--model", "models", multiple=True, metavar="M[,M...]", required=required,
                        callback=_names("falcon-7b,llama-7b"), help=help)


def dtype_option(default: Sequence[str] = DEFAULT_DTYPES, help: str = "") -> Callable:
    """-d/--dtype: weight schemes; left out, `default` (the callback fills it in, so the help shows it)."""
    def callback(ctx, param, values):
        return given_list("dtype", values, "bf16,int8,nf4") or list(default)
    return click.option("-d", "--dtype", "dtypes", multiple=True, metavar="D[,D...]", callback=callback,
                        help=(help or f"Schemes: {', '.join(SCHEMES)}.") + f" Default: {','.join(default)}.")


def context_option(help: str = "Tokens in the KV cache (prompt + generated); 8k = 8192.") -> Callable:
    return click.option("-c", "--context", "contexts", multiple=True, metavar="N[,N...]",
                        callback=_counts("context", DEFAULT_CONTEXT), help=f"{help} Default: {DEFAULT_CONTEXT}.")


def batch_option(help: str = "Sequences per batch.") -> Callable:
    return click.option("-b", "--batch", "batches", multiple=True, metavar="B[,B...]",
                        callback=_counts("batch", DEFAULT_BATCH), help=f"{help} Default: {DEFAULT_BATCH}.")


def count_option(option: str, default: int, help: str) -> Callable:
    """A list of token counts, e.g. --prompt-tokens 128,1k (for run's shape matrix)."""
    return click.option(f"--{option}", option.replace("-", "_"), multiple=True, metavar="N[,N...]",
                        callback=_counts(option, default), help=f"{help} Default: {default}.")


class Choice(click.Choice):
    """click.Choice, case-insensitive, whose error suggests the near miss: `--device cdua` → 'cuda'."""

    def __init__(self, choices: Sequence[str]):
        super().__init__(list(choices), case_sensitive=False)

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as error:
            flag = param.opts[-1] if param is not None else "value"
            raise UsageError(f"{flag} {value!r} is not one of {', '.join(self.choices)}."
                             f"{did_you_mean(str(value), self.choices)} Example: {flag} {self.choices[0]}") from error


def kv_dtype_option() -> Callable:
    return click.option("--kv-dtype", type=Choice(KV_DTYPE_CHOICES), default=KV_DTYPE_AUTO, show_default=True,
                        help="KV cache element type; auto: the scheme's compute dtype, as transformers allocates it.")


def attn_option() -> Callable:
    return click.option("--attn", "attn_impl", type=Choice(ATTN_IMPLS), default=DEFAULT_ATTN,
                        show_default=True, help="Attention kernel: eager materializes the score matrix.")


def attn_list_option() -> Callable:
    """--attn for run's matrix: one or more attention kernels (`sdpa,eager`)."""
    def callback(ctx, param, values):
        kernels = given_list("attn", values, "sdpa,eager") or [DEFAULT_ATTN]
        for kernel in kernels:
            if kernel not in ATTN_IMPLS:
                raise UsageError(f"--attn {kernel!r} is not an attention kernel. Choose from: {', '.join(ATTN_IMPLS)}"
                                 ". Example: --attn sdpa,eager")
        return kernels
    return click.option("--attn", "attn_impls", multiple=True, metavar="A[,A...]", callback=callback,
                        help=f"Attention kernels ({', '.join(ATTN_IMPLS)}): eager materializes the score matrix. "
                             f"Default: {DEFAULT_ATTN}.")


def device_option() -> Callable:
    return click.option("--device", type=Choice(DEVICES), default=DEFAULT_DEVICE, show_default=True,
                        help="cuda counts the CUDA context; cpu plans or runs without one.")


SIZE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | None, option: str = "--memory-cap", example: str = "4G") -> int | None:
    """'512M', '2G', '1.5GiB', '60MiB' or a byte count → bytes (powers of 1024): the one spelling of a size."""
    if text is None:
        return None
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = SIZE_UNITS.get(raw[-1:], 1)
    try:
        value = float(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        value = -1
    if not 1 <= value < math.inf:
        raise UsageError(f"{option} needs a size such as 512M or 2G, got {text!r}. Example: {option} {example}")
    return int(value)


MAX_MEMORY_EXAMPLE = "0=20GiB,cpu=60GiB"
# NOTE: accelerate's `convert_file_size_to_int`, which reads the same budgets in a script: KiB..GiB are powers of
# 1024, KB..GB powers of 1000 (a lowercase b is bits there); it knows no TiB or TB
MAX_MEMORY_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_budget(text: str, device: str) -> int:
    """One --max-memory size as accelerate reads it: '20GiB' (20 × 2^30), '20GB' (20 × 10^9), or a byte count;
    0 leaves that device out. A bare '20G' is refused: --memory-cap reads it as GiB, accelerate not at all."""
    raw = text.strip()
    upper = raw.upper()
    unit = next((u for u in sorted(MAX_MEMORY_UNITS, key=len, reverse=True) if upper.endswith(u)), "")
    example = f"--max-memory {device}=20GiB (20 × 2^30 bytes) or {device}=20GB (20 × 10^9)"
    if unit and not unit.endswith("IB") and not raw.endswith("B"):
        raise UsageError(f"--max-memory {device}={text}: accelerate reads a lowercase b as bits. Write {example}")
    try:
        value = float(raw[:len(raw) - len(unit)]) * MAX_MEMORY_UNITS.get(unit, 1)
    except ValueError:
        value = -1
    if not 0 <= value < math.inf:
        raise UsageError(f"--max-memory {device}: a size must be a byte count or carry a unit, KiB, MiB, GiB (powers "
                         f"of 1024) or KB, MB, GB (powers of 1000), got {text!r}. Write {example}")
    return int(value)


def parse_max_memory(text: str | None) -> dict[str, int] | None:
    """`0=20GiB,cpu=60GiB` → {"0": bytes, "cpu": bytes}: a budget per GPU index and for the CPU."""
    if text is None:
        return None
    budgets: dict[str, int] = {}
    for item in split_list(text):
        device, equals, size = item.partition("=")
        device = device.strip().lower()
        if not equals or not device:
            raise UsageError(f"--max-memory takes DEVICE=SIZE pairs, got {item!r}. Example: --max-memory "
                             f"{MAX_MEMORY_EXAMPLE}")
        if not (device == "cpu" or (device.isascii() and device.isdigit())):
            raise UsageError(f"--max-memory: unknown device {device!r}; use a GPU index (0, 1, ...) or cpu. "
                             f"Example: --max-memory {MAX_MEMORY_EXAMPLE}")
        if device in budgets:
            raise UsageError(f"--max-memory names {device} twice. Example: --max-memory {MAX_MEMORY_EXAMPLE}")
        budgets[str(int(device)) if device != "cpu" else device] = parse_budget(size, device)
    if not budgets:
        raise UsageError(f"--max-memory was given an empty value. Example: --max-memory {MAX_MEMORY_EXAMPLE}")
    return budgets


def device_map_options(offload: bool = False) -> Callable:
    """--device-map and --max-memory (and, for run, --offload-folder): how accelerate splits the layers."""
    options = [
        click.option("--device-map", type=Choice(DEVICE_MAPS), default=None,
                     help="Split the layers over GPUs, CPU and disk as transformers' from_pretrained does (auto is "
                          "balanced; sequential fills each device in turn). Default: all on --device. Example: "
                          "--device-map auto --max-memory 0=20GiB,cpu=60GiB"),
        click.option("--max-memory", metavar="DEV=SIZE[,...]", default=None,
                     help="Budget per GPU index and for cpu, sizes as accelerate reads them: 20GiB is 20 × 2^30 "
                          "bytes, 20GB 20 × 10^9, a plain number bytes; 0 leaves a GPU out. What does not fit goes "
                          "to disk. Needs --device-map. Example: --max-memory cpu=120MiB"),
    ]
    if offload:
        options.append(click.option(
            "--offload-folder", type=click.Path(file_okay=False), default=None,
            help="Where layers mapped to disk are written when they must be: disk layers are read at every "
                 "forward, from the model's own safetensors file when it has one (the folder then stays empty and "
                 "is removed). Without a GPU the CPU runs every layer. Default: OUTPUT/offload. Example: "
                 "--offload-folder /scratch/off"))
    return apply(*options)


def format_option() -> Callable:
    return click.option("-f", "--format", "fmt", type=Choice(FORMATS), default="table", show_default=True,
                        help="table for people; json, csv and markdown for tools and documents.")


def apply(*options: Callable) -> Callable:
    """Stack click options in the order given (as they appear in --help)."""
    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate
