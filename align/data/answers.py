"""Reference answers out of worked solutions: the last `\\boxed{}` (MATH) and the text after `####` (GSM8K).

These operate on trusted dataset text (reference solutions), not on model output, which only ever goes through
`align.grading`. They are plain string scans: nothing is parsed or evaluated.
"""

from __future__ import annotations

import re


_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if there is none.

    Also accepts the brace-less form `\\boxed 5` that appears in a few MATH solutions (the argument then ends at the
    next space, `$` or end of text). An unclosed `\\boxed{` yields None rather than a truncated answer.
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(command for command in _BOX_COMMANDS if text.startswith(command, start))
    rest = text[start + len(command) :]
    if rest.startswith(" "):
        bare = re.match(r" +([^\s$]+)", rest)
        return bare.group(1) if bare else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for position, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:position]
    return None


def split_gsm8k_answer(text: str) -> tuple[str, str] | None:
    """Split a GSM8K `answer` field into (worked solution, final answer); None when it has no `####` line.

    The solution drops the `<<48/2=24>>` calculator annotations and puts one step per paragraph (MATH style, steps
    separated by blank lines); the final answer drops thousands separators (`1,000` -> `1000`).
    """
    body, sep, final = text.rpartition("####")
    if not sep:
        return None
    final = final.strip().replace(",", "")
    steps = [line.strip() for line in _GSM8K_CALCULATOR.sub("", body).splitlines() if line.strip()]
    return "\n\n".join(steps), final
