"""The files align ships besides code: training recipes and accelerate configs.

In a checkout they are the top-level `recipes/` and `accelerate_configs/`, where the design card puts them; a wheel
carries them inside the package, as `align/recipes/` and `align/accelerate_configs/` (pyproject.toml says how).
`shipped_dir` finds them either way, so `align demo` and `align train --accelerate-config zero3` work from an
installed wheel as they do from the source tree.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


SHIPPED = ("recipes", "accelerate_configs")


def shipped_dir(name: str) -> Path:
    """The directory `name` (one of `SHIPPED`): the installed package's copy, else the checkout's top-level one.

    A wheel installs the copy next to the modules; a source checkout and an editable install have none (their
    package is the source tree), and the directory is the one next to the package.
    """
    if name not in SHIPPED:
        raise ValueError(f"align ships {SHIPPED}, not {name!r}")
    # Installed packages are directories on disk, so the Traversable is a real path (accelerate needs a file name).
    packaged = Path(str(importlib.resources.files("align") / name))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / name


def recipe_path(relative: str) -> Path:
    """A shipped recipe, e.g. `recipe_path("smollm2-135m-instruct/dco.yaml")`."""
    path = shipped_dir("recipes") / relative
    if not path.is_file():
        raise FileNotFoundError(f"align ships no recipe {relative!r} (looked in {path.parent})")
    return path
