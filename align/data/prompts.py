"""Prompt formatting shared by training and evaluation, so a model is evaluated on the prompt it was trained on.

Two styles:
- `chat` (default): one user turn `"{problem}\\n\\n{instruction}"` rendered with the tokenizer's chat template
  (the instruction in the user turn follows the DeepSeek-R1 / open-r1 MATH-500 recipe);
- `plain`: `"Problem: {problem}\\n{instruction}\\nSolution:"` for base models without a chat template.
"""

from __future__ import annotations


DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("chat", "plain")


def user_message(problem: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    return f"{problem}\n\n{instruction}" if instruction else problem


def prompt_messages(problem: str, instruction: str | None = DEFAULT_INSTRUCTION) -> list[dict]:
    """The conversational prompt TRL trainers take (`prompt` column of a prompt/completion dataset)."""
    return [{"role": "user", "content": user_message(problem, instruction)}]


def plain_prompt(problem: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    middle = f"\n{instruction}" if instruction else ""
    return f"Problem: {problem}{middle}\nSolution:"


def render_prompt(problem: str, tokenizer=None, instruction: str | None = DEFAULT_INSTRUCTION, style: str = "chat"):
    """The exact text a generator is given: the chat template with a generation prompt, or the plain template."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "plain":
        return plain_prompt(problem, instruction)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The 'chat' prompt style needs a tokenizer with a chat template; use --prompt-style plain for base models."
        )
    return tokenizer.apply_chat_template(
        prompt_messages(problem, instruction), tokenize=False, add_generation_prompt=True
    )
