"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all but the heavy experiments), each printing
JSON lines."""

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    modules = pkgutil.iter_modules([str(Path(__file__).parent)])
    # Packages are not benchmarks: benchmarks/gpu/ is the GPU kit (run.sh), with a runner of its own.
    return sorted(m.name for m in modules if not m.ispkg and m.name != "common" and not m.name.startswith("_"))


def default_set() -> list[str]:
    """Every benchmark but the heavy experiments (modules with `HEAVY = True`), which run only when named."""
    import ast

    heavy = set()
    for name in available():
        tree = ast.parse((Path(__file__).parent / f"{name}.py").read_text())
        for node in tree.body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if "HEAVY" in targets and isinstance(node.value, ast.Constant) and node.value.value is True:
                heavy.add(name)
    return [name for name in available() if name not in heavy]


def main(argv: list[str]) -> int:
    names = argv or default_set()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    for name in names:
        print(f"# benchmark {name}", file=sys.stderr, flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
