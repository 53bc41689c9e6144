"""The error align raises for bad input, as opposed to a bug.

`InputError` is a problem with what the user gave align (a path, a recipe field, a dataset row, a samples file): its
message names the file, row, field or value and how to fix it, in one line. `align <command>` prints it as
`align <command>: <message>` and exits with status 2; any other exception is a bug and keeps its traceback
(`align.cli`). `--debug` or `ALIGN_DEBUG=1` shows the traceback of an input error too.

Error classes of their own (`InvalidRowError`, `SamplesFileError`, `DatasetUnavailableError`, ...) subclass it, so
`except InputError` catches every one. It is a `ValueError`, as a bad value was always reported.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (path, field, value, row); the message says what is wrong and how to fix it."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file or directory the user named does not exist."""
