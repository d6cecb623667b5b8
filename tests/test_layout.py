"""The README's layout section is the package's map: every module of ``src/ltc`` is listed there, and each imports
only modules listed above it (so the map stays true as code moves)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "ltc"
IMPORT = re.compile(r"^\s*(?:from\s+(?:\.+|ltc\.)(\w+)|import\s+ltc\.(\w+))", re.M)
# ``from . import a, b`` (often lazy, inside a function): the names are modules of the package
IMPORT_NAMES = re.compile(r"^\s*from\s+(?:\.|ltc)\s+import\s+\(?([\w, ]+)", re.M)


def layout_order() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```\nsrc/ltc/\n"):]
    block = block[: block.index("\n```", 4)]
    order = re.findall(r"^  (\w+)(?:\.py|/)|; (\w+)\.py:", block, re.M)
    return [a or b for a, b in order]


def top_level(path: Path) -> str:
    return path.relative_to(PKG).with_suffix("").parts[0]


def test_every_module_is_on_the_map() -> None:
    listed = set(layout_order())
    modules = {top_level(p) for p in PKG.rglob("*.py")} - {"__main__"}
    assert modules - listed == set(), f"modules missing from the README's layout: {sorted(modules - listed)}"
    assert listed - modules == set(), f"the README's layout lists modules that do not exist: {listed - modules}"


def test_modules_import_only_what_is_listed_above_them() -> None:
    order = layout_order()
    rank = {m: i for i, m in enumerate(order)}
    wrong = []
    for path in PKG.rglob("*.py"):
        mod = top_level(path)
        if mod not in rank:
            continue
        text = path.read_text()
        targets = [a or b for a, b in IMPORT.findall(text)]
        if path.parent != PKG:  # in a subpackage, ``from . import x`` is a sibling, not a top-level module
            names = []
        else:
            names = [n.strip().split(" as ")[0] for m in IMPORT_NAMES.findall(text) for n in m.split(",")]
        for target in targets + names:
            if target in rank and target != mod and rank[target] > rank[mod]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}, listed below {mod}")
    assert wrong == [], "\n".join(wrong)
