"""Every ```python block of README.md runs as written (in order, in one namespace, like a notebook, in a temporary
folder), so the README cannot drift from the package again. ``pytest -k readme`` runs these tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return [m.group(1) for m in BLOCK.finditer(text)]


def run_blocks(text: str, workdir: Path) -> int:
    """Execute the python blocks of ``text`` in order in one namespace with ``workdir`` as the current folder;
    an ``AssertionError`` names the block (1-based), its first line and the exception when one fails."""
    blocks = python_blocks(text)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(workdir)
    try:
        for i, code in enumerate(blocks, 1):
            try:
                exec(compile(code, f"README.md python block {i}", "exec"), namespace)
            except Exception as exc:  # noqa: BLE001 - any failure of a block is the finding
                first = code.strip().splitlines()[0] if code.strip() else ""
                raise AssertionError(f"README.md python block {i} ({first!r}) failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return len(blocks)


def test_readme_python_blocks_run(tmp_path: Path) -> None:
    n = run_blocks(README.read_text(encoding="utf-8"), tmp_path)
    assert n >= 2, "the README should show the API in at least two python blocks"


def test_readme_check_fails_on_a_broken_block(tmp_path: Path) -> None:
    """The check is not vacuous: a README whose second block calls a name the package does not export fails, and
    the message names that block."""
    broken = "intro\n```python\nimport ltc\n```\ntext\n```python\nltc.compress_everything()\n```\n"
    with pytest.raises(AssertionError, match=r"python block 2 .*AttributeError: module 'ltc' has no attribute"):
        run_blocks(broken, tmp_path)


def test_readme_blocks_are_found_exactly() -> None:
    text = "```bash\nltc demo\n```\n```python\na = 1\n```\n```\nplain\n```\n```python\nb = 2\n\nc = 3\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n\nc = 3\n"]
