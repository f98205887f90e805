"""Write README.md's task option tables from the tasks' contract.

Each built-in task's options, with type, range, default and meaning, come
from :mod:`bitinglip.platform.tasks` (the one place they are declared) and go
between the README's ``options`` markers.  ``--check`` writes nothing and
exits 1 when the README differs (``tests/unit/test_readme_options.py`` runs
it).  Usage: ``python tools/readme_options.py [--check]`` or ``make readme``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitinglip.platform.tasks import TASK_OPTIONS, option_rows

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- options:begin (written by tools/readme_options.py) -->", "<!-- options:end -->"


def tables() -> str:
    """The option tables, as Markdown."""
    out: list[str] = []
    for task in TASK_OPTIONS:
        out += [f"`{task}`:", "", "| option | type | range | default | meaning |", "|---|---|---|---|---|"]
        for name, kind, span, default, meaning in option_rows(task):
            cell = meaning.replace("|", "\\|")
            out.append(f"| `{name}` | {kind} | {span.replace('|', '/')} | `{default}` | {cell} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def with_tables(text: str) -> str:
    """``text`` (the README) with the tables between its markers."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{tables()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's tables are not the contract's")
    args = parser.parse_args(argv)
    text = README.read_text()
    wanted = with_tables(text)
    if args.check:
        if wanted != text:
            print("README.md's option tables differ from the contract: run `make readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
