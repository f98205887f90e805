"""README.md's task option tables are the contract's (issue 22): written by
``tools/readme_options.py`` (``make readme``), checked here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from bitinglip.platform.tasks import TASK_OPTIONS, bounded

TOOL = Path(__file__).resolve().parents[2] / "tools" / "readme_options.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_options", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_tables_are_the_contracts() -> None:
    tool = _tool()
    assert tool.main(["--check"]) == 0, "README.md's option tables differ from the contract: run `make readme`"


def test_the_tables_show_each_bound_and_a_stale_table_is_caught() -> None:
    tool = _tool()
    tables = tool.tables()
    for model in TASK_OPTIONS.values():
        for name, b in bounded(model):
            high = f"{b.high:g}" if isinstance(b.high, float) else str(b.high)
            assert any(line.startswith(f"| `{name}` |") and f", {high}]" in line for line in tables.splitlines()), name
    readme = tool.README.read_text()
    stale = readme.replace("| [0, 2] |", "| [0, 100] |")  # the README's hand-written temperature range until issue 22
    assert stale != readme and tool.with_tables(stale) == readme
