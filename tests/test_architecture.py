"""The design's rooms (docs/architecture.md) hold: import-linter contracts, and modules small enough to read."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "align"
MAX_MODULE_LINES = 400


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _top_level_modules() -> set[str]:
    names = {f"align.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    names |= {f"align.{path.name}" for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    return names


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' (import-linter is a dev dependency)")
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_losses_contract_names_every_other_align_module():
    """A new top-level module must be added to the losses contract, or losses/ could import it unnoticed."""
    (losses,) = [c for c in _contracts() if c.get("source_modules") == ["align.losses"]]
    missing = _top_level_modules() - {"align.losses"} - set(losses["forbidden_modules"])
    assert not missing, f"add {sorted(missing)} to the losses contract's forbidden_modules in pyproject.toml"
    stale = {m for m in losses["forbidden_modules"] if m.startswith("align.")} - _top_level_modules()
    assert not stale, f"{sorted(stale)} no longer exist: remove them from the losses contract"


def test_no_module_is_too_large_to_read():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_large = {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_large, f"modules above {MAX_MODULE_LINES} lines (split them by job): {too_large}"
