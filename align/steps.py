"""Reasoning steps of a completion: where its steps end in the text, and which tokens belong to each step.

One definition of a step serves the package: the implicit PRM's step rewards (`align.prm`, Yuan et al. 2024, §3)
and DCO's step mode (DCO_step in `align.trainers.dco`, Chen et al. 2025) split a completion the same way, so a
step the PRM scores is the step DCO weights.

- Text: a step ends after each run of the literal `separator` (`DEFAULT_STEP_SEPARATOR`, "\\n\\n", by default; the
  separator belongs to the step it ends), or after each match of a regex `pattern` (a lookahead such as
  `(?=Step \\d+:)` starts a step at each header). `DEFAULT_STEP_PATTERN` is the default as a regex, for callers
  that take one. Boundaries at the very start or end of the text make no empty steps (`step_char_spans`).
- Tokens: a token belongs to the step holding its last character (`assign_tokens_to_steps`), so a token merged
  across a boundary (".\\n\\nThe") is counted once, in the step whose text it completes, and a step's log-prob
  never includes text of a later step.

The PRM finds token offsets with the tokenizer's offset mapping (`segment_completion`); DCO decodes the trained
tokens one by one (`step_segment_ids`), which works whatever the chat template or truncation.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass


DEFAULT_STEP_SEPARATOR = "\n\n"


def separator_pattern(separator: str) -> str:
    """The regex of `step_char_spans`'s literal-separator rule: one or more `separator` in a row."""
    return f"(?:{re.escape(separator)})+"


DEFAULT_STEP_PATTERN = separator_pattern(DEFAULT_STEP_SEPARATOR)


@dataclass
class Segmentation:
    """A tokenized prompt + completion and the completion's steps, before any model runs."""

    input_ids: list[int]  # prompt + completion (+ end-of-turn) tokens
    completion_start: int  # index in input_ids of the first scored (completion) token
    token_spans: list[tuple[int, int]]  # character span in `text` of each completion token
    step_spans: list[tuple[int, int]]  # character span in `text` of each step
    step_ends: list[int]  # exclusive boundaries into the completion tokens: step k is [ends[k-1], ends[k])
    text: str  # completion + end-of-turn text
    truncated: bool = False


def step_char_spans(
    text: str, separator: str | None = DEFAULT_STEP_SEPARATOR, pattern: str | re.Pattern | None = None
) -> list[tuple[int, int]]:
    """Contiguous [start, end) spans covering `text`, one per step (at least one, even for empty text).

    A step ends after each run of the literal `separator`, or, when `pattern` is given, after each regex match.
    Boundaries at the very start or end of the text do not create empty steps.
    """
    if pattern is None and not separator:
        return [(0, len(text))]
    regex = re.compile(pattern if pattern is not None else separator_pattern(separator))
    # A match at the very start (a leading separator) stays in the first step instead of making an empty one.
    ends = sorted({m.end() for m in regex.finditer(text) if m.start() > 0 and m.end() < len(text)})
    return spans_from_step_ends(len(text), ends)


def spans_from_step_ends(length: int, ends: Sequence[int]) -> list[tuple[int, int]]:
    """Spans [0, e1), [e1, e2), ..., [e_last, length) from strictly increasing interior step ends."""
    bounds = [0, *[int(end) for end in ends if 0 < int(end) < length], length]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def assign_tokens_to_steps(token_spans: Sequence[tuple[int, int]], step_spans: Sequence[tuple[int, int]]) -> list[int]:
    """Exclusive token boundary of each step: tokens [ends[k−1], ends[k]) belong to step k.

    A token belongs to the step holding its last character (a zero-width token: the one holding its start), so a
    token merged across a step boundary is counted once, in the step whose text it completes. Tokens must be in
    text order, as a tokenizer's offset mapping is.
    """
    starts = [start for start, _ in step_spans]
    counts = [0] * len(step_spans)
    for start, end in token_spans:
        anchor = end - 1 if end > start else start
        counts[max(bisect.bisect_right(starts, anchor) - 1, 0)] += 1
    ends, total = [], 0
    for count in counts:
        total += count
        ends.append(total)
    return ends


def segment_completion(
    tokenizer,
    prompt: str,
    completion: str,
    step_ends: Sequence[int] | None = None,
    separator: str | None = DEFAULT_STEP_SEPARATOR,
    pattern: str | None = None,
    suffix: str = "",
    max_length: int | None = None,
    index: int = 0,
) -> Segmentation:
    """Tokenize `prompt + completion + suffix` in one piece and map the completion's steps to its tokens.

    `step_ends`: explicit character offsets (in the completion) where steps end; otherwise steps come from
    `separator`/`pattern` (see `step_char_spans`). The suffix (the end-of-turn text) joins the last step; a completion
    that already ends with it (generated text that kept its end-of-turn token) does not get it twice. `index` names
    the completion in error messages.
    """
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise TypeError(
            f"completion {index}: prompt and completion must be strings (rendered prompt text and the generated "
            f"text), got {type(prompt).__name__} and {type(completion).__name__}"
        )
    if step_ends is None:
        spans = step_char_spans(completion, separator, pattern)
    else:
        ends = [int(end) for end in step_ends]
        if any(b <= a for a, b in zip(ends, ends[1:])) or any(not 0 < e <= len(completion) for e in ends):
            raise ValueError(
                f"completion {index}: step_ends {ends} must be strictly increasing character offsets in "
                f"(0, {len(completion)}] (where each step ends in the completion)"
            )
        spans = spans_from_step_ends(len(completion), ends)
    stripped = suffix.rstrip()
    if suffix and stripped and completion.endswith(stripped):
        suffix = suffix[len(stripped) :]
    text = completion + suffix
    spans[-1] = (spans[-1][0], len(text))
    encoding = tokenizer(
        prompt + text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
    )
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    boundary = len(prompt)
    # A completion token is any token reaching past the prompt (one merged across the boundary included).
    first = next((i for i, (s, e) in enumerate(offsets) if e > boundary or s >= boundary), len(ids))
    first = max(first, 1)  # the first token of a sequence has no log-prob: it is never scored
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
        cut = offsets[len(ids) - 1][1] - boundary if len(ids) > first else 0
        spans = [span for span in spans if span[0] < cut] or spans[:1]
    token_spans = [(max(s - boundary, 0), max(e - boundary, 0)) for s, e in offsets[first : len(ids)]]
    return Segmentation(
        input_ids=ids,
        completion_start=first,
        token_spans=token_spans,
        step_spans=spans,
        step_ends=assign_tokens_to_steps(token_spans, spans),
        text=text,
        truncated=truncated,
    )


def step_segment_ids(labels: Sequence[int], tokenizer, pattern: str | re.Pattern = DEFAULT_STEP_PATTERN) -> list[int]:
    """The step index (0, 1, ...) of every trained token of one example, -1 for tokens outside the loss (label -100).

    Steps are found in the text of the trained tokens: each token is decoded on its own and the pieces are
    concatenated, which gives every token a character span in that text whatever the chat template, truncation or
    tokenizer. The text is split by `pattern` as `step_char_spans` does and tokens are assigned by
    `assign_tokens_to_steps` (the step holding a token's last character); every gap in the trained tokens (a new
    assistant turn) starts a step as well.
    """
    positions = [i for i, token in enumerate(labels) if token != -100]
    ids = [-1] * len(labels)
    if not positions:
        return ids
    pieces = tokenizer.batch_decode(
        [[labels[i]] for i in positions], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    token_spans, offset = [], 0
    for piece in pieces:
        token_spans.append((offset, offset + len(piece)))
        offset += len(piece)
    step_ends = assign_tokens_to_steps(token_spans, step_char_spans("".join(pieces), pattern=pattern))
    raw_steps, gaps = [], 0
    for k, position in enumerate(positions):
        if k and position != positions[k - 1] + 1:
            gaps += 1
        raw_steps.append((gaps, bisect.bisect_right(step_ends, k)))
    # Number the steps 0, 1, 2, ... in order (a step can hold no token, e.g. one inside a token spanning several).
    dense = {}
    for position, step in zip(positions, raw_steps):
        ids[position] = dense.setdefault(step, len(dense))
    return ids


def plan_batches(
    encoded: list[Segmentation], batch_size: int, *, share_prompt: bool = True
) -> list[tuple[list[int] | None, list[list[int]]]]:
    """[(shared prefix tokens or None, batches of indices into `encoded`)]: the completions of each prompt that has
    several (with `share_prompt`) as one group, to score against its prefix's key/value cache, the rest batched across
    prompts; longest first within each, so batches hold similar lengths and padding stays small."""
    from collections import defaultdict

    def longest_first(indices: list[int]) -> list[list[int]]:
        order = sorted(indices, key=lambda i: -len(encoded[i].input_ids))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, item in enumerate(encoded):
        # the prefix is everything before the prompt's last token: that token's output scores the first completion
        # token, so it must run with the completion
        groups[tuple(item.input_ids[: item.completion_start - 1])].append(index)
    plan, rest = [], []
    for prefix, indices in groups.items():
        if share_prompt and prefix and len(indices) > 1:
            plan.append((list(prefix), longest_first(indices)))
        else:
            rest += indices
    if rest:
        plan.append((None, longest_first(rest)))
    return plan
