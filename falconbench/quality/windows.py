"""Sliding-window scoring plan: which tokens each forward pass sees, and which of them it scores.

As in Hugging Face's "Perplexity of fixed-length models" guide (transformers docs, `perplexity`): the window
moves by `stride`, and each window scores only the tokens no earlier window scored, so every token after the
first is scored exactly once, with up to `window - 1` tokens of context.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One forward pass over tokens [begin, end) that scores tokens [first_target, end)."""

    begin: int
    end: int
    first_target: int

    def __post_init__(self):
        if not 0 <= self.begin < self.first_target < self.end:
            raise ValueError(f"invalid window {self}: need 0 <= begin < first_target < end")

    @property
    def rows(self) -> tuple[int, int]:
        """The scored rows [start, stop): row r holds the prediction of token r + 1."""
        return self.first_target - 1, self.end - 1

    @property
    def logit_slice(self) -> slice:
        """The positions of this window's logits that predict its scored tokens."""
        return slice(self.first_target - 1 - self.begin, self.end - 1 - self.begin)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..n_tokens-1 once each (token 0 has no context and is never scored)."""
    if n_tokens < 2 or window < 2 or not 1 <= stride < window:
        raise ValueError(f"need n_tokens >= 2, window >= 2 and 1 <= stride < window; got {n_tokens}, {window}, "
                         f"{stride}")
    windows, scored_until = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return windows
