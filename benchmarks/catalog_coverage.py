"""How much of the installed transformers' causal-LM catalog falconbench plans exactly.

Run: python benchmarks/catalog_coverage.py [--markdown] [TYPE ...]
For every model type with a causal-LM class, runs the oracle of tests/catalog_oracle.py (the default config on the
meta device: parameters and bf16/int8/nf4 bytes; a shrunken copy on CPU: the cache after prefill and a decode step)
and prints "N of M causal-LM types exact", then each other type with the reason. Nothing here is asserted; the
same oracle is asserted by tests/test_catalog.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import catalog_oracle as oracle  # noqa: E402


def reason(verdict: oracle.Verdict) -> str:
    if verdict.builds:
        return f"default config does not build on the meta device ({verdict.builds})"
    return "; ".join(r for r in (verdict.weights, verdict.kv) if r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="the list as Markdown bullets, for the README")
    parser.add_argument("types", nargs="*", help="model types (default: the whole catalog)")
    args = parser.parse_args()
    start = time.perf_counter()
    types = args.types or oracle.catalog()
    verdicts = [oracle.verdict(t) for t in types]
    exact = [v for v in verdicts if v.exact]
    import transformers

    print(f"{len(exact)} of {len(verdicts)} causal-LM types exact (transformers {transformers.__version__}, "
          f"{sum(v.reader for v in exact)} of them also by a hand-written reader; "
          f"{time.perf_counter() - start:.0f} s)")
    for verdict in verdicts:
        if not verdict.exact:
            label = f" [labelled {verdict.labelled}]" if verdict.wrong("general path") else ""
            line = f"{verdict.model_type}: {reason(verdict)}{label}"
            print(f"- `{line.replace(':', '`:', 1)}" if args.markdown else line)


if __name__ == "__main__":
    main()
