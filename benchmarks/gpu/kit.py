"""What every check of the GPU kit shares: sizes (full or `--tiny`), random-weight models built from configs, long
synthetic rows, trainer arguments for the device, and the device's synchronize / autocast / peak memory.

Nothing is downloaded: a model is a transformers config with random weights (seed 0) saved next to align's tiny
byte-level tokenizer (`align.testing.build_tiny_tokenizer`, 400 tokens). The model's vocabulary is the real
model's (151936 for Qwen2-1.5B), so the LM head and embedding cost what they cost in training; the tokenizer
only ever produces ids below 400, and decoding skips the sampled ids it does not know.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path


class SkipCheck(Exception):
    """Raised by a check that cannot run here; the runner records it as skipped, with this message as the reason."""


@dataclass(frozen=True)
class Shape:
    """A model architecture and its config fields (those of the named release; weights are random)."""

    name: str
    arch: str  # "qwen2" or "llama"
    fields: dict = field(default_factory=dict)


# Qwen/Qwen2-1.5B's config.json: 28 layers, hidden 1536, 12 query / 2 KV heads, tied embeddings.
QWEN2_1_5B = Shape(
    "qwen2-1.5b-shaped",
    "qwen2",
    dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
)
# The same layers, 4 of them: the DeepSpeed checks launch three processes that each load the model.
QWEN2_1_5B_4_LAYERS = Shape("qwen2-1.5b-shaped-4-layers", "qwen2", {**QWEN2_1_5B.fields, "num_hidden_layers": 4})
# meta-llama/Llama-3.1-8B's layer shape with 8 of its 32 layers (2.8 B parameters, a third in the 128k vocabulary).
LLAMA_8B_8_LAYERS = Shape(
    "llama-8b-shaped-8-layers",
    "llama",
    dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=8,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
)
_TINY_FIELDS = dict(
    vocab_size=1024,  # above the tokenizer's 400, like the real shapes: unknown sampled ids must decode
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
_TINY_QWEN2 = Shape("qwen2-tiny", "qwen2", {**_TINY_FIELDS, "tie_word_embeddings": True})
TINY_SHAPES = {
    QWEN2_1_5B.name: _TINY_QWEN2,
    QWEN2_1_5B_4_LAYERS.name: _TINY_QWEN2,
    LLAMA_8B_8_LAYERS.name: Shape("llama-tiny", "llama", {**_TINY_FIELDS, "tie_word_embeddings": False}),
}


@dataclass(frozen=True)
class Sizes:
    """Batch and sequence sizes of the checks: the issue's on a GPU, small ones for `--tiny`."""

    seq_len: int  # T of the SFT/DCO checks
    batch: int  # sequences per SFT/DCO step
    pair_len: int  # max_length of one side of a preference pair
    pairs: int  # preference pairs (or PRM rows) per step
    long_lengths: tuple[int, ...]  # T of the attention-entropy checks (batch 1)
    rounds: int  # timed rounds per variant (after one warm-up)
    grpo_prompts: int
    grpo_generations: int
    completion_len: int  # GRPO completions
    generation_batches: tuple[int, ...]  # hf backend
    new_tokens: int  # hf backend
    scoring_completions: int  # PRM scoring
    deepspeed_steps: int


FULL = Sizes(1024, 4, 512, 4, (4096, 8192), 4, 2, 8, 64, (1, 16, 64), 128, 64, 4)
TINY = Sizes(128, 4, 64, 2, (256, 512), 2, 2, 4, 8, (1, 16, 64), 8, 8, 3)


class Kit:
    """The device, the sizes, the work directory and the models built so far (each built once per run)."""

    def __init__(self, device: str, tiny: bool, workdir: str | os.PathLike):
        import torch

        self.device, self.tiny = device, tiny
        self.cuda = device.startswith("cuda")
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
        self.sizes = TINY if tiny else FULL
        self.workdir = Path(workdir)
        self.soft_deadline = float("inf")  # set by the runner per check: timed loops stop adding rounds after it
        self._models: dict[str, str] = {}
        self.cache: dict = {}  # results checks share (the DeepSpeed checks' plain run)
        self._torch = torch

    # --- models and data --------------------------------------------------------------------------------------------

    def shape(self, shape: Shape) -> Shape:
        return TINY_SHAPES[shape.name] if self.tiny else shape

    def model(self, shape: Shape = QWEN2_1_5B) -> str:
        """Path of a saved random-weight model of `shape` (its tiny stand-in with `--tiny`), built on first use."""
        shape = self.shape(shape)
        if shape.name not in self._models:
            self._models[shape.name] = build_model(shape, self.workdir / "models" / shape.name, self.device)
        return self._models[shape.name]

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model())

    def describe_model(self, shape: Shape = QWEN2_1_5B) -> str:
        shape = self.shape(shape)
        fields = shape.fields
        return f"{shape.name} ({fields['num_hidden_layers']} layers, hidden {fields['hidden_size']})"

    # --- trainers ---------------------------------------------------------------------------------------------------

    def trainer_args(self, name: str, **fields) -> dict:
        """TrainingArguments every check shares: bf16 mixed precision on CUDA (float32 master weights, the way
        align's `bf16: auto` trains), float32 on CPU; no checkpoints, logging or progress bars in timed steps."""
        init = {"dtype": "float32", **fields.pop("model_init_kwargs", {})}
        defaults = dict(
            output_dir=str(self.workdir / "runs" / name),
            report_to="none",
            save_strategy="no",
            logging_steps=1_000_000,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            gradient_checkpointing=False,
            bf16=self.cuda,
            use_cpu=not self.cuda,
            model_init_kwargs=init,
        )
        return {**defaults, **fields}

    def autocast(self):
        """bf16 autocast on CUDA. The Trainer leaves autocast to accelerate's wrapping of the model in `train()`;
        timed steps call `training_step` directly, so they enter it themselves."""
        if not self.cuda:
            return contextlib.nullcontext()
        return self._torch.autocast("cuda", dtype=self._torch.bfloat16)

    @property
    def inference_dtype(self) -> str:
        return "bfloat16" if self.cuda else "float32"

    # --- measuring --------------------------------------------------------------------------------------------------

    def synchronize(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self._torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        """Peak CUDA memory allocated since `reset_peak` (MiB); None on CPU (the CPU checks report peak RSS)."""
        if not self.cuda:
            return None
        return round(self._torch.cuda.max_memory_allocated() / 2**20, 1)

    def release(self) -> None:
        """Give back cached CUDA memory between checks, so one check's leftovers do not count in the next."""
        import gc

        gc.collect()
        if self.cuda:
            self._torch.cuda.empty_cache()

    def out_of_time(self) -> bool:
        return time.monotonic() > self.soft_deadline


def build_model(shape: Shape, directory: Path, device: str) -> str:
    """Save a random-weight model of `shape` (seed 0, bf16 on CUDA, float32 on CPU) and the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    from align.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    special = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[shape.arch](**shape.fields, **special)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):  # initialise on the GPU: a 1.5 B model's random init takes minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(**special)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return str(directory)


def long_problems(tokenizer, count: int, tokens: int, seed: int = 0):
    """`count` synthetic problems whose solutions are padded to about `tokens` tokens (prompt included).

    Steps of other synthetic solutions are put in front of each problem's own solution, whose last step (the
    `\\boxed{}` answer, where `corrupt_solution` makes its slip) stays last. The synthetic solutions are a few
    dozen tokens, so without this every sequence of a check at T = 1024 would be mostly padding.
    """
    from align.data.synthetic import generate_problems

    problems = generate_problems(count, "train", levels=(1, 2, 3), seed=seed)
    pool = generate_problems(64, "train", levels=(3, 4, 5), seed=seed + 1)
    steps = [step for p in pool for step in p.solution.split("\n\n")[:-1]]
    lengths = {step: len(tokenizer(step + "\n\n")["input_ids"]) for step in set(steps)}
    filler = itertools.cycle(steps)
    padded = []
    for problem in problems:
        used = len(tokenizer(problem.problem + "\n\n" + problem.solution)["input_ids"]) + 32  # + chat template
        extra = []
        while used < tokens:
            step = next(filler)
            extra.append(step)
            used += lengths[step]
        padded.append(replace(problem, solution="\n\n".join([*extra, problem.solution])))
    return padded


def first_batches(trainer, count: int) -> list:
    """The first `count` batches of the trainer's own dataloader (its collator), on the CPU."""
    return [batch for batch, _ in zip(trainer.get_train_dataloader(), range(count))]


def batch_tokens(batch) -> int:
    """Real (unpadded) tokens in a collated batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return sum(int(batch[key].numel()) for key in batch if key.endswith("input_ids"))
