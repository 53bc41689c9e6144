"""align installs as a package: the wheel carries the recipes and accelerate configs, and works outside the checkout.

The slow test builds a wheel of the working tree, installs it into a fresh venv that reuses this environment's
dependencies, and runs `align` from a directory that is not the checkout (so nothing can be found relative to it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _shipped_files() -> dict[str, Path]:
    """Wheel path (align/recipes/...) -> file, for every file of the directories pyproject.toml maps into align."""
    files = {}
    for package, directory in _setuptools_config()["package-dir"].items():
        for path in sorted((ROOT / directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[f"{package.replace('.', '/')}/{path.relative_to(ROOT / directory)}"] = path
    return files


def test_package_data_patterns_cover_every_shipped_file():
    """A file in recipes/ or accelerate_configs/ that no pattern matches would be missing from wheels, silently."""
    config = _setuptools_config()
    for package, directory in config["package-dir"].items():
        matched = {p for pattern in config["package-data"][package] for p in (ROOT / directory).glob(pattern)}
        missing = [p for p in (ROOT / directory).rglob("*") if p.is_file() and p not in matched]
        assert not missing, f"add patterns for {missing} to [tool.setuptools.package-data] {package!r}"
    assert (ROOT / "align" / "py.typed").is_file() and "py.typed" in config["package-data"]["align"]


def test_in_a_checkout_the_shipped_files_are_the_top_level_directories(tmp_path, monkeypatch):
    from align.distributed import resolve_accelerate_config
    from align.resources import recipe_path, shipped_dir

    assert shipped_dir("recipes") == ROOT / "recipes"
    assert shipped_dir("accelerate_configs") == ROOT / "accelerate_configs"
    assert recipe_path("smollm2-135m-instruct/dco.yaml") == ROOT / "recipes" / "smollm2-135m-instruct" / "dco.yaml"
    with pytest.raises(FileNotFoundError, match="no recipe"):
        recipe_path("smollm2-135m-instruct/no_such_method.yaml")
    with pytest.raises(ValueError, match="align ships"):
        shipped_dir("eval")
    monkeypatch.chdir(tmp_path)  # no accelerate_configs/ here: the shipped ones are used
    assert resolve_accelerate_config("zero3") == ROOT / "accelerate_configs" / "zero3.yaml"


def _copy_working_tree(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files as they are now: what is committed plus what is being written,
    without build leftovers (a stale build/ in the checkout would leak deleted modules into the wheel)."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is listed but gone
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def _run(command: list, cwd: Path, env: dict | None = None, tmp: Path | None = None) -> str:
    """Run `command`, fail with its output unless it succeeds; print it and its first lines (paths under `tmp` as
    $TMP); return stderr + stdout (stderr first: a launch prints its command there)."""

    def short(text: str) -> str:
        return text.replace(str(tmp), "$TMP") if tmp else text

    print(short(f"$ {' '.join(str(part) for part in command)}"))
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stderr + proc.stdout
    assert proc.returncode == 0, output[-4000:]
    noise = ("Warning", "warnings.warn", "Looking in ")  # Python warnings, pip's index lines
    lines = [line for line in output.splitlines() if line.strip() and not any(word in line for word in noise)]
    print("\n".join(f"  {short(line)[:200]}" for line in lines[:3]))
    return output


@pytest.mark.slow
def test_a_wheel_installs_and_runs_from_outside_the_checkout(tmp_path):
    source, dist, venv, outside = (tmp_path / name for name in ("src", "dist", "venv", "outside"))
    _copy_working_tree(source)
    # No build isolation: the build uses this environment's setuptools instead of downloading one (CI is offline).
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".", "-w", dist],
        source,
        tmp=tmp_path,
    )
    (wheel,) = dist.glob("align-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(set(_shipped_files()) - names)
    assert not missing and "align/py.typed" in names and "align/training.py" in names, missing

    # A fresh venv that sees this environment's packages (torch, trl, ...) through a .pth file, so nothing is
    # downloaded; `--system-site-packages` would expose the base interpreter's, not this venv's. The .pth files of
    # that directory are not processed, so its editable install of align stays invisible.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
    ).stdout.strip()
    Path(purelib, "_align_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: the editable align of this environment is visible and must be neither used nor uninstalled
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--quiet", wheel], tmp_path, tmp=tmp_path)

    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    align = str(venv / "bin" / "align")
    where = _run(
        [
            python,
            "-c",
            "import align, align.training as t, align.resources as r; "
            "print(align.__file__); print(t.default_recipe('dco')); print(r.shipped_dir('accelerate_configs'))",
        ],
        outside,
        env,
        tmp_path,
    ).split()
    assert all(path.startswith(purelib) for path in where), where  # the installed package and its own data
    assert "default model" in _run([align, "env"], outside, env, tmp_path)
    dco, sft = (Path(purelib, "align", "recipes", "smollm2-135m-instruct", f"{m}.yaml") for m in ("dco", "sft"))
    assert "method: dco" in _run([align, "train", "dco", "--config", dco, "--dry_run"], outside, env, tmp_path)
    launch = [align, "train", "sft", "--config", sft, "--accelerate-config", "cpu_ddp", "--num-processes", "2"]
    output = _run([*launch, "--dry_run"], outside, env, tmp_path)
    assert f"--config_file {Path(purelib, 'align', 'accelerate_configs', 'cpu_ddp.yaml')}" in output
    assert "method: sft" in output
    plan = _run([align, "demo", "--quick", "--dry-run"], outside, env, tmp_path)
    assert str(Path(purelib, "align", "recipes")) in plan
