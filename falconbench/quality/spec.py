"""What a quality measurement scores and how: the settings, and the evaluation tokens they select."""

from __future__ import annotations

import hashlib
import stat
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data import EVAL_TEXT, EVAL_TEXT_NAME
from ..errors import UsageError
from ..planner import check_positive

LOGPROB_DTYPES: tuple[str, ...] = ("float16", "float32")
DEFAULT_GREEDY_PROMPT = "The history of the old town begins with"
# NOTE: a byte budget for the stored reference (tokens × vocabulary × 2 or 4 bytes), so a large --eval-tokens
# fails before minutes of work rather than filling the disk: 2 GiB is 16k tokens of a 65k vocabulary in float16.
MAX_REFERENCE_BYTES = 2 * 2**30
# The text is read only this far (characters per requested token), so a huge --eval-text file is not tokenized
# whole; English averages about 4 characters per token, so 32 leaves a wide margin.
CHARS_PER_TOKEN_BOUND = 32


@dataclass(frozen=True)
class QualitySpec:
    """Quality settings shared by every configuration of a run (all schemes must use the same ones)."""

    reference: str = "bf16"  # the scheme the others are compared against
    eval_text: Path | None = None  # None: the shipped public-domain text
    eval_tokens: int = 2048
    window: int = 1024  # tokens the model sees at once
    stride: int = 512  # how far the window moves; each token is scored once
    logprob_dtype: str = "float16"  # how the reference's log-probabilities are stored
    greedy_prompt: str = DEFAULT_GREEDY_PROMPT
    greedy_tokens: int = 32
    bootstrap_resamples: int = 1000
    ci_block_tokens: int = 64  # the resampling unit of the bootstrap: contiguous blocks of scored tokens
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        for name in ("eval_tokens", "window", "stride", "greedy_tokens", "bootstrap_resamples", "ci_block_tokens"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        if self.eval_tokens < 2 or self.window < 2:
            raise UsageError("eval-tokens and window must be at least 2: a token is scored from the ones before it")
        if self.stride >= self.window:
            raise UsageError(f"stride ({self.stride}) must be smaller than window ({self.window}), so each window "
                             "scores its tokens with context and none is skipped. Lower --stride")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise UsageError(f"logprob_dtype must be one of {', '.join(LOGPROB_DTYPES)}, not {self.logprob_dtype!r}")
        if not 0 < self.confidence < 1:
            raise UsageError(f"confidence must lie strictly between 0 and 1, got {self.confidence!r}")
        if not self.reference or not self.greedy_prompt.strip():
            raise UsageError("reference and greedy_prompt must not be empty")

    def text_path(self) -> Path:
        return Path(self.eval_text).expanduser() if self.eval_text is not None else EVAL_TEXT

    def text_name(self) -> str:
        return str(self.text_path()) if self.eval_text is not None else EVAL_TEXT_NAME

    def stored_settings(self) -> dict[str, Any]:
        """The settings that shape the stored reference (the bootstrap's do not)."""
        settings = asdict(self)
        for name in ("bootstrap_resamples", "ci_block_tokens", "confidence", "seed", "eval_text"):
            settings.pop(name)
        return settings


@dataclass(frozen=True)
class EvalTokens:
    """The tokens every configuration is scored on, with fingerprints of the text and of the tokens."""

    ids: tuple[int, ...]
    text_name: str
    text_sha256: str
    token_hash: str

    def __post_init__(self):
        if len(self.ids) < 2:
            raise UsageError(f"the evaluation text {self.text_name} gives {len(self.ids)} token(s); at least 2 are "
                             "needed. Pass a longer --eval-text")


def token_hash(ids) -> str:
    """A fingerprint of a token sequence (sha256 of the ids as little-endian int32), 16 hex digits."""
    ids = list(ids)
    return hashlib.sha256(struct.pack(f"<{len(ids)}i", *ids)).hexdigest()[:16]


def read_eval_text(spec: QualitySpec) -> tuple[str, str]:
    """The evaluation text (bounded) and the sha256 of the whole file."""
    path = spec.text_path()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the evaluation text {path}: {exc.strerror or exc}. "
                         "Check the --eval-text path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (byte {exc.start}). Pass a UTF-8 text file") from None
    return text[: spec.eval_tokens * CHARS_PER_TOKEN_BOUND], hashlib.sha256(raw).hexdigest()


def check_eval_text(spec: QualitySpec) -> None:
    """Refuse, before any work, an evaluation text that is not a regular file of UTF-8 with some words in it."""
    path = spec.text_path()
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as exc:
        raise UsageError(f"cannot read the evaluation text {path}: {exc.strerror or exc}. Check the --eval-text "
                         "path") from None
    if not regular:
        raise UsageError(f"the evaluation text {path} is not a regular file. Pass a UTF-8 text file")
    text, _ = read_eval_text(spec)
    if not text.strip():
        raise UsageError(f"the evaluation text {path} is empty. Pass a UTF-8 text file with some prose in it")


def load_eval_tokens(tokenizer, spec: QualitySpec) -> EvalTokens:
    """Tokenize the evaluation text once and keep its first `eval_tokens` tokens (fewer if the text is short)."""
    text, text_sha256 = read_eval_text(spec)
    ids = tuple(int(i) for i in tokenizer(text)["input_ids"][: spec.eval_tokens])
    return EvalTokens(ids, spec.text_name(), text_sha256, token_hash(ids))
