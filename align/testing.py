"""Tiny, fully offline models for tests and benchmarks.

`build_tiny_model(output_dir)` trains a byte-level BPE tokenizer on a small math corpus with the `tokenizers`
library and writes it next to a randomly initialised 2-layer Llama, so that TRL can reload the model from a path
(DPO reloads its reference model from `config._name_or_path`). Nothing here touches the network.
"""

from __future__ import annotations

import os


# ChatML with `{% generation %}` markers around assistant content, so TRL's `assistant_only_loss=True` can build
# its assistant masks from the template itself instead of swapping in a training template.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def _training_corpus() -> list[str]:
    """Text resembling what the tests feed the model: chat turns, step-by-step arithmetic, LaTeX answers."""
    lines = [
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "What is 12 + 7? First add the tens. Then add the ones.\n\nThe answer is \\boxed{19}.",
        "Solve for x: 3x + 5 = 20. Subtract 5 from both sides.\n\nDivide by 3.\n\nSo x = \\boxed{5}.",
        "Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. The final answer is \\boxed{\\frac{5}{6}}.",
        "Tom has 4 apples and buys 9 more. How many apples does he have? 4 + 9 = 13. \\boxed{13}",
        "The capital of France is Paris. Hello world! The quick brown fox jumps over the lazy dog.",
        "Step 1: multiply. Step 2: subtract. Step 3: check the result. \\left( 3, \\frac{\\pi}{2} \\right)",
    ]
    digits = [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(0, 30, 3) for b in range(0, 30, 7)]
    return lines * 20 + digits


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) with ChatML special tokens and the tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(output_dir: str | os.PathLike, seed: int = 0, num_hidden_layers: int = 2) -> str:
    """Write a tiny Llama (hidden 64, 4 heads, 2 KV heads) and its tokenizer to `output_dir`; return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    output_dir = os.fspath(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def perturbed_copy(model_dir: str | os.PathLike, scale: float = 0.05, seed: int = 0):
    """The model saved in `model_dir` with N(0, scale²) noise added to every weight (seeded): a stand-in for a trained
    policy or PRM whose log-ratios to `model_dir` are non-zero."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model
