"""A stand-in generation backend for harness tests: scripted completions instead of a model."""

import re

from align.evaluation.generation import Completion, GenerationBackend


class ScriptedBackend(GenerationBackend):
    """Returns `script(prompt)[j]` as sample j of a prompt and counts its calls (a stand-in for a model)."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.calls, self.prompts_seen = script, 0, []

    def prompts_per_call(self, n):
        return 2

    def generate(self, prompts, sampling):
        self.calls += 1
        self.prompts_seen += prompts
        return [
            [Completion(text, len(text.split()), "stop") for text in self.script(prompt)[: sampling.n]]
            for prompt in prompts
        ]


def arithmetic_script(prompt: str) -> list[str]:
    """Synthetic level-1 problems: samples 0-1 right, 2 wrong, 3 unanswered (so pass@1 = 0.5 exactly)."""
    a, op, b = re.search(r"(\d+) ([+-]) (\d+)", prompt).groups()
    right = int(a) + int(b) if op == "+" else int(a) - int(b)
    return [
        f"So $\\boxed{{{right}}}$.",
        f"It is $\\boxed{{{right}.0}}$.",
        f"$\\boxed{{{right + 1}}}$",
        "I do not know.",
    ]
