"""Every recipe parses through `align train`'s parser (unknown keys fail) and builds its configs without a model.

A recipe names its method in its header comment (`# align train <method> --config <this file>`), which doubles as
its documentation; the test reads the method from there.
"""

import re
from pathlib import Path

import pytest

from align.cli import main as align_main


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))
LAUNCH_LINE = re.compile(r"(?:align|align\.cli)\s+train\s+(\w+)\s+--config\s+(\S+)")


def method_of(recipe: Path) -> str:
    """The method named by the header's launch line (continuation backslashes joined)."""
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header).replace("\\ ", " ")
    expected = str(recipe.relative_to(recipe.parents[2]))
    for match in LAUNCH_LINE.finditer(text):
        if match.group(2).endswith(expected):
            return match.group(1)
    raise AssertionError(f"{recipe}: no '# align train <method> --config {expected}' launch line in the header")


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(recipe, capsys):
    method = method_of(recipe)
    # GPU recipes ask for bf16, which transformers only accepts on a CPU machine together with use_cpu.
    assert align_main(["train", method, "--config", str(recipe), "--dry_run", "--use_cpu", "true"]) == 0
    out = capsys.readouterr().out
    assert f"method: {method}" in out
