"""Final answers out of text: the last `\\boxed{}` (MATH solutions and model completions), a "final answer is $...$"
statement, and the text after `####` (GSM8K).

These are plain string scans in linear time: nothing is parsed or evaluated, so they are safe on untrusted model
output (whose equivalence to a gold answer is then decided by `align.grading`, in worker processes).
"""

from __future__ import annotations

import re


_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])|[{}]")
_BARE_ARGUMENT = re.compile(r" +([^\s${}]+)")
_NON_SPACE = re.compile(r"\S")
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")
# "(final) answer is $x$" / "answer: $x$" (or \(x\), \[x\], $$x$$) with nothing but spaces before the math
_FINAL_ANSWER = re.compile(
    r"\banswer(?:\s+is:?|\s*:)\s*(?:\$\$(?P<display>[^$]{1,1000}?)\$\$|\$(?P<inline>[^$]{1,1000}?)\$"
    r"|\\\((?P<paren>.{1,1000}?)\\\)|\\\[(?P<bracket>.{1,1000}?)\\\])",
    re.IGNORECASE | re.DOTALL,
)


def _boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of every closed `\\boxed{...}` / `\\fbox{...}`, sorted by start.

    One pass over the box commands and braces with a stack of open boxes, so even `\\boxed{` repeated a million times
    costs linear time. The brace-less form `\\boxed 5` (a few MATH solutions) spans the token after the space.
    """
    spans: list[tuple[int, int]] = []
    open_boxes: list[tuple[int, int]] = []  # (content start, brace depth outside the box)
    depth = 0
    skip_brace_at = -1  # the "{" that opens a box was already counted with its command
    for match in _BOX_TOKENS.finditer(text):
        token, at = match.group(), match.start()
        if token == "{":
            if at != skip_brace_at:
                depth += 1
        elif token == "}":
            if depth == 0:
                continue
            depth -= 1
            if open_boxes and open_boxes[-1][1] == depth:
                spans.append((open_boxes.pop()[0], at))
        elif text.startswith("{", match.end()):
            open_boxes.append((match.end() + 1, depth))
            depth += 1
            skip_brace_at = match.end()
        else:
            bare = _BARE_ARGUMENT.match(text, match.end())
            if bare:
                spans.append(bare.span(1))
    return sorted(spans)


def boxed_answers(text: str) -> list[str]:
    """Contents of every closed `\\boxed{...}` / `\\fbox{...}` in `text`, in order of their opening."""
    return [text[start:end] for start, end in _boxed_spans(text)]


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{...}` (or `\\fbox{...}`) in `text`; None if there is none.

    Empty boxes are skipped: models often repeat the instruction "put your final answer within \\boxed{}" after
    their answer. An unclosed `\\boxed{` yields nothing rather than a truncated answer.
    """
    for start, end in reversed(_boxed_spans(text)):
        if _NON_SPACE.search(text, start, end):
            return text[start:end]
    return None


def final_answer(text: str) -> str | None:
    """The answer a completion commits to: its last non-empty `\\boxed{}`, else the math of its last "answer is $...$"
    or "answer: $...$" statement (math right after the words); None when it does neither. Math elsewhere near the
    word "answer" ("the answer to $80 - 18$ is ...") and numbers in prose are not answers."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for match in reversed(list(_FINAL_ANSWER.finditer(text))):
        content = next(group for group in match.groups() if group is not None).strip()
        if content:
            return content
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
