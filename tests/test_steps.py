"""One definition of a reasoning step (align.steps): the implicit PRM's step split and DCO's step mode agree on the
default separator, on where steps end in the text and on which tokens belong to each step."""

import bisect
import dataclasses
import inspect
import re

import pytest

from align.steps import (
    DEFAULT_STEP_PATTERN,
    DEFAULT_STEP_SEPARATOR,
    segment_completion,
    step_char_spans,
    step_segment_ids,
)


class _PieceTokenizer:
    """Token id i decodes to PIECES[i]: lets a test choose exactly where tokens straddle step boundaries."""

    def __init__(self, pieces):
        self.pieces = pieces

    def batch_decode(self, ids, **kwargs):
        return [self.pieces[token] for [token] in ids]


def _texts(text, spans):
    return [text[s:e] for s, e in spans]


@pytest.mark.parametrize(
    "text",
    [
        "We add.\n\nThen check.\n\nAnswer 7.",
        "\n\nLeading.\n\n\n\nTrailing.\n\n",
        "Odd run.\n\n\nNext.",
        "Spaces.\n \nNot a separator.",
        "one step",
        "",
    ],
)
def test_the_default_pattern_is_the_default_separator_as_a_regex(text):
    assert step_char_spans(text, pattern=DEFAULT_STEP_PATTERN) == step_char_spans(text, DEFAULT_STEP_SEPARATOR)
    assert step_char_spans(text) == step_char_spans(text, DEFAULT_STEP_SEPARATOR)


def test_the_trainers_and_the_scorer_default_to_the_same_step():
    from align.prm import ImplicitPRM
    from align.trainers.dco import DCOConfig
    from align.trainers.implicit_prm import ImplicitPRMConfig

    def default(config, name):
        return next(f.default for f in dataclasses.fields(config) if f.name == name)

    assert default(DCOConfig, "dco_step_separator") == DEFAULT_STEP_PATTERN
    assert default(ImplicitPRMConfig, "step_separator") == DEFAULT_STEP_SEPARATOR
    assert inspect.signature(ImplicitPRM).parameters["step_separator"].default == DEFAULT_STEP_SEPARATOR


def test_a_token_straddling_a_boundary_belongs_to_the_step_it_completes():
    pieces = ["We add", ".\n\nThe", " sum", ".\n\n", "Done."]
    steps = step_segment_ids([-100, 0, 1, 2, 3, 4], _PieceTokenizer(pieces))
    # ".\n\nThe" ends in the second step ("The sum.\n\n"), so it is counted there, as the PRM counts it.
    assert steps == [-1, 0, 1, 1, 1, 2]


def test_lookahead_patterns_start_a_step_at_each_header():
    pieces = ["Step 1:", " add.", " Step 2:", " check."]
    assert step_segment_ids([0, 1, 2, 3], _PieceTokenizer(pieces), r"(?= Step \d+:)") == [0, 0, 1, 1]


def test_dco_step_ids_and_prm_segmentation_agree(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "Question: what is 45 + 23?\n"
    completion = "We add 45 and 23.\n\n$45 + 23 = 68$.\n\n\n\nCheck: 68 - 23 = 45.\n\nThe answer is $\\boxed{68}$."
    segmentation = segment_completion(tokenizer, prompt, completion)
    assert len(segmentation.step_spans) == 4
    ids = segmentation.input_ids
    labels = [-100] * segmentation.completion_start + ids[segmentation.completion_start :]
    dco = step_segment_ids(labels, tokenizer, re.compile(DEFAULT_STEP_PATTERN))
    prm = [bisect.bisect_right(segmentation.step_ends, k) for k in range(len(ids) - segmentation.completion_start)]
    assert dco[segmentation.completion_start :] == prm
    assert set(dco[: segmentation.completion_start]) == {-1}
    assert _texts(completion, segmentation.step_spans)[1] == "$45 + 23 = 68$.\n\n\n\n"
