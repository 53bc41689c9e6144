"""Problems (MATH, GSM8K, synthetic, local files) in one schema, prompts, and trainer dataset builders."""

from align.data.loaders import LoadedProblems, load_problems
from align.data.prompts import DEFAULT_INSTRUCTION, render_prompt
from align.data.schema import InvalidRowError, Problem


__all__ = ["DEFAULT_INSTRUCTION", "InvalidRowError", "LoadedProblems", "Problem", "load_problems", "render_prompt"]
