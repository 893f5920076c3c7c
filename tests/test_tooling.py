"""ruff and mypy, configured in pyproject.toml, are clean; every type: ignore says why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "mailbackup", "tests", "benchmarks", "examples"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_type_ignore_in_the_package_gives_a_reason() -> None:
    bare = re.compile(r"# type: ignore(\[[^\]]*\])?\s*$")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in (ROOT / "mailbackup").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert found == []
