"""`align <command> ...`: the single entry point.

Commands are the modules of `align.commands` (a module or a package of subcommands). Each defines `HELP`, a one-line
description, and `main(argv) -> int | None`, and parses its own arguments, so a command's options live next to its
code and heavy libraries are imported only by the command that runs. Also runnable as `python -m align.cli` (which
is what `accelerate launch -m align.cli ...` uses).

Bad input (`align.errors.InputError`: a missing path, a mistyped recipe field, an invalid row) is reported as one
line, `align <command>: <message>`, with exit status 2; any other exception is a bug and keeps its traceback.
`--debug` (anywhere on the command line) or `ALIGN_DEBUG=1` shows the traceback of an input error too.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from types import ModuleType

from align.errors import InputError


DEBUG_ENV = "ALIGN_DEBUG"


def discover(package: str) -> dict[str, ModuleType]:
    """Subcommand name -> module, for every public module in `package` (sorted by name)."""
    root = importlib.import_module(package)
    commands = {}
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda info: info.name):
        if not info.name.startswith("_"):
            commands[info.name.replace("_", "-")] = importlib.import_module(f"{package}.{info.name}")
    return commands


def usage(prog: str, package: str, commands: dict[str, ModuleType]) -> str:
    width = max(map(len, commands), default=0)
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {getattr(module, 'HELP', '')}" for name, module in commands.items()]
    lines += ["", f"Run '{prog} <command> --help' for a command's options."]
    return "\n".join(lines)


def dispatch(prog: str, package: str, argv: list[str]) -> int:
    """Run the subcommand named by argv[0] among the modules of `package`."""
    commands = discover(package)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage(prog, package, commands))
        return 0
    name, rest = argv[0], argv[1:]
    module = commands.get(name) or commands.get(name.replace("_", "-"))
    if module is None:
        print(f"{prog}: unknown command {name!r}\n\n{usage(prog, package, commands)}", file=sys.stderr)
        return 2
    try:
        result = module.main(rest)
    except InputError as error:
        if debug_enabled():
            raise
        # the message names what is wrong and how to fix it; a traceback would only bury it
        print(f"{prog} {name}: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def main(argv: list[str] | None = None) -> int:
    """The `align` program. With `argv=None` it owns the process (console script, `python -m align.cli`)."""
    owns_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if "--debug" in argv:
        # through the environment, so that processes align starts (accelerate launch) show tracebacks too
        os.environ[DEBUG_ENV] = "1"
        argv = [arg for arg in argv if arg != "--debug"]
    if argv and argv[0] in {"--version", "-V"}:
        from align import __version__

        print(f"align {__version__}")
        return 0
    status = dispatch("align", "align.commands", argv)
    if owns_process and status == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown()
    return status


def exit_without_teardown() -> None:
    """End a rank of a finished multi-process run now, skipping the interpreter's teardown.

    By this point everything is saved and the process group is destroyed. Tearing down the C++ side (gloo and
    DeepSpeed threads) has been seen to abort a rank with "terminate called without an active exception" (SIGABRT)
    in roughly one CPU launch in twenty, after the run had finished; a script that calls `trainer.end()` and then
    exits normally aborted every time in our DDP test. accelerate then reports the whole launch as failed, and so
    would Slurm. os._exit skips those destructors; the output streams are flushed first. Scripts of your own that
    hit this can call it as their last line.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
