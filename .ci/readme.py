"""The README's code blocks, for CI and tests/test_readme.py (standard library only: it runs in a fresh venv).

    python .ci/readme.py command N       print the README's Nth shell command
    python .ci/readme.py width           print the width the README's console blocks were printed at
    python .ci/readme.py check-plan FILE check that FILE (what the first command printed) ends with the README's
                                         `falconbench plan` block
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
WIDTH = 80  # the terminal width the README's console blocks were printed at (COLUMNS=80)
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text(encoding="utf-8")) if lang == kind]


def first_commands(count: int) -> list[str]:
    """The first `count` shell commands of the README's bash blocks (comments skipped)."""
    lines = [line for body in blocks("bash") for line in body.splitlines() if line.strip() and
             not line.lstrip().startswith("#")]
    return lines[:count]


def console_output(command: str) -> str:
    """What the README shows under `$ COMMAND` (the first console block that starts with it)."""
    for body in blocks("console"):
        first, _, rest = body.partition("\n")
        if first == f"$ {command}" or first.startswith(f"$ {command} "):
            return rest
    raise LookupError(f"no console block for {command!r} in the README")


def python_example() -> tuple[str, str]:
    """The Python API example and the output shown after it."""
    return blocks("python")[0], blocks("text")[0]


def strip_trailing(text: str) -> str:
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def main(argv: list[str]) -> int:
    if argv[:1] == ["command"]:
        print(first_commands(int(argv[1]))[int(argv[1]) - 1])
        return 0
    if argv[:1] == ["width"]:
        print(WIDTH)
        return 0
    if argv[:1] == ["check-plan"]:
        printed = strip_trailing(Path(argv[1]).read_text(encoding="utf-8"))
        shown = console_output("falconbench plan")
        if not printed.endswith(shown):  # pip's own lines come first
            print(f"README's `falconbench plan` block differs from what it printed:\n{printed}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
