"""Options of `align eval` (and of the `align data` builders, which sample the same way), as dataclasses.

Parsed by TRL's `TrlParser`: every field is a `--flag` (dashes or underscores), `--config eval/math500.yaml` sets
defaults from YAML, flags override the YAML, and unknown keys are an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.data.loaders import ROW_FORMATS
from align.data.prompts import DEFAULT_INSTRUCTION, PROMPT_STYLES
from align.evaluation.backends import (
    BACKEND_REGISTRY,
    backend_names,
    check_backend_options,
    parse_backend_kwargs,
)
from align.evaluation.batching import parse_batch_size
from align.evaluation.exact_coverage import DEFAULT_FORMAT
from align.evaluation.generation import SamplingConfig
from align.evaluation.openai_backend import OpenAIBackend, ServerArguments
from align.grading import GradingArguments
from align.losses.implicit_reward import AGGREGATES
from align.models import DEFAULT_MODEL
from align.precision import resolve_inference_dtype


def _backend_options_help() -> str:
    return "; ".join(f"{name}: {', '.join(backend.options) or 'none'}" for name, backend in BACKEND_REGISTRY.items())


@dataclass
class SamplingRunArguments(ServerArguments, GradingArguments):
    """What to sample from (model, problems, prompt) and how (sampling, backend, grading).

    The grading options (`grader_workers`, `grading_timeout`) come from `align.grading.GradingArguments`, shared
    with the online trainers; `--base-url`, `--served-model`, `--api-key-env` (`--backend openai`) from
    `align.evaluation.openai_backend.ServerArguments`, which folds them into `backend_kwargs`.
    """

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "Model alias, local directory, Hub id or PEFT adapter directory (e.g. an `align train` run)."
        },
    )
    dataset: str = field(
        default="math500",
        metadata={
            "help": "`math500`, `math`, `gsm8k`, `synthetic`, a Hub dataset id, or a local .jsonl/.json/.parquet file."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (subset) name."})
    split: str = field(default="test", metadata={"help": "Dataset split."})
    limit: int | None = field(
        default=None, metadata={"help": "Use the first N problems (required for `synthetic`, which is unbounded)."}
    )
    column_mapping: str | None = field(
        default=None,
        metadata={"help": "Map schema fields to the dataset's columns, e.g. `problem=question,answer=final`."},
    )
    row_format: str = field(
        default="auto",
        metadata={"help": f"How rows give their answer: one of {ROW_FORMATS} (see align.data.loaders)."},
    )
    skip_invalid: bool = field(
        default=False, metadata={"help": "Skip (and count in the summary) invalid rows instead of failing."}
    )
    synthetic_levels: list[int] = field(
        default_factory=lambda: [1], metadata={"help": "Difficulty levels (1-5) of the synthetic task."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic generator."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(default=512, metadata={"help": "Cap on generated tokens per sample."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed of sampling (per sequence: independent of batch size and sharding) and of maj@k."},
    )
    backend: str = field(
        default="auto",
        metadata={"help": f"One of {backend_names()}; auto = vllm if importable and a GPU is present."},
    )
    backend_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Engine options of the backend, `key=value,key=value` or a YAML mapping (e.g. "
            f"`tensor_parallel_size=2,gpu_memory_utilization=0.85`). Accepted: {_backend_options_help()}. "
            "Not part of the run's identity (run_config.json): a run may resume under other engine options."
        },
    )
    # typed str so the command line keeps "auto" (HfArgumentParser turns `int | str` into int); __post_init__ makes
    # it an int or "auto"
    batch_size: str = field(
        default="auto",
        metadata={
            "help": "hf: sequences per generate call; vllm, openai: prompts handed over per call (`auto`: 64; "
            "openai: at least 2 x max_concurrency). `auto` (hf): the largest "
            "batch whose KV cache fits a quarter of free memory, capped at 64 on a CPU and 256 on a GPU "
            "(align.evaluation.batching); the value used is logged and stored in summary.json's `engine`."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model dtype: `auto` is bfloat16 on a bf16 GPU or a CPU with native bf16 (AVX-512 BF16/AMX), "
            "float16 on older GPUs, float32 otherwise (align.precision); or float32, bfloat16, float16."
        },
    )
    prompt_style: str = field(
        default="chat", metadata={"help": f"One of {PROMPT_STYLES}: chat template, or plain text for base models."}
    )
    prompt_instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction appended to every problem (as in training)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        if self.backend not in backend_names():
            raise ValueError(f"backend must be one of {backend_names()}, got {self.backend!r}")
        options = self.with_server_options(self.backend, parse_backend_kwargs(self.backend_kwargs))
        self.backend_kwargs = check_backend_options(self.backend, options)
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.row_format not in ROW_FORMATS:
            raise ValueError(f"row_format must be one of {ROW_FORMATS}, got {self.row_format!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        self.batch_size = parse_batch_size(self.batch_size)
        super().__post_init__()

    def sampling(self, n: int) -> SamplingConfig:
        return SamplingConfig(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )

    def identity(self, n: int, backend: str) -> dict:
        """What makes stored samples reusable: a resumed run must agree on all of it."""
        identity = {
            "model": self.model,
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split": self.split,
            "column_mapping": self.column_mapping,
            "row_format": self.row_format,
            "synthetic_levels": list(self.synthetic_levels) if self.dataset == "synthetic" else None,
            "synthetic_seed": self.synthetic_seed if self.dataset == "synthetic" else None,
            "sampling": self.sampling(n).to_dict(),
            "backend": backend,
            # what `auto` means here, not the word: a run resumed on other hardware must not mix precisions
            "dtype": resolve_inference_dtype(self.dtype, _default_device()),
            "prompt_style": self.prompt_style,
            "prompt_instruction": self.prompt_instruction,
        }
        if backend == OpenAIBackend.name:  # --model is only the tokenizer there: the samples are the served model's
            identity["served_model"] = self.backend_kwargs.get("served_model")
        return identity


@dataclass
class EvalConfig(SamplingRunArguments):
    """`align eval`: sample n completions per problem, grade them, report pass@k / maj@k (/ bon@k with a PRM)."""

    n: int | None = field(
        default=None,
        metadata={
            "help": "Samples per problem; pass@k and maj@k are reported for k <= n. Default 1, or 0 (no sampling) "
            "with --exact-coverage."
        },
    )
    exact_coverage: bool = field(
        default=False,
        metadata={
            "help": "Also score every problem by exact coverage (align.evaluation.exact_coverage): p = π(canonical "
            "completion + EOS | prompt) by one forward pass, and the pass@N lower bound 1 - (1 - p)^N for N = 1..10^4 "
            "(exact_coverage.jsonl, summary.json `exact_coverage`, exact_coverage.png), under --temperature/--top-p."
        },
    )
    exact_coverage_format: str = field(
        default=DEFAULT_FORMAT,
        metadata={
            "help": "The canonical completion of exact coverage, ANSWER replaced by the gold answer (default: the "
            "direct-answer training target `$\\boxed{ANSWER}$`)."
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Run directory: samples.jsonl, summary.json, passk.png. Rerunning it resumes."},
    )
    samples: str | None = field(
        default=None,
        metadata={
            "help": "Re-grade (and re-score with --prm) an existing samples.jsonl instead of generating; writes into "
            "--output-dir (default: the file's directory)."
        },
    )
    maj_num_subsets: int = field(
        default=1000,
        metadata={
            "help": "weighted_maj@k averages over all k-subsets if there are at most this many, else this many "
            "random ones (maj@k, bon@k, pass@k are exact)."
        },
    )
    prm: str | None = field(
        default=None, metadata={"help": "Implicit PRM (align.prm) to score samples: adds bon@k, weighted_maj@k."}
    )
    score_field: str | None = field(
        default=None,
        metadata={
            "help": "With --samples: read each sample's score from this field of the samples file (an external "
            "ORM's/PRM's), instead of scoring with --prm: adds bon@k, weighted_maj@k."
        },
    )
    prm_ref: str | None = field(default=None, metadata={"help": "Reference model of the PRM (default: its own)."})
    prm_aggregate: str = field(default="min", metadata={"help": f"Step rewards -> sample score: one of {AGGREGATES}."})
    prm_beta: float | None = field(default=None, metadata={"help": "PRM beta (default: the PRM's own)."})
    prm_batch_size: int = field(default=8, metadata={"help": "Completions per PRM forward pass."})
    plot: bool = field(default=True, metadata={"help": "Write passk.png."})

    def __post_init__(self):
        super().__post_init__()
        if self.n is None:
            self.n = 0 if self.exact_coverage else 1
        if self.n < (0 if self.exact_coverage else 1):
            raise ValueError(f"n must be >= 1 (or 0 with --exact-coverage), got {self.n}")
        if self.exact_coverage and self.samples:
            raise ValueError(
                "exact_coverage scores the model on the dataset's problems, which --samples does not read: run "
                "--exact-coverage without --samples"
            )
        if self.exact_coverage and "ANSWER" not in self.exact_coverage_format:
            raise ValueError(
                f"exact_coverage_format {self.exact_coverage_format!r} has no ANSWER slot for the gold answer, "
                "e.g. '$\\boxed{ANSWER}$'"
            )
        if self.samples is None and self.output_dir is None:
            raise ValueError(
                "output_dir is required (where samples.jsonl and summary.json go), e.g. --output-dir runs/x"
            )
        if self.prm_aggregate not in AGGREGATES:
            raise ValueError(f"prm_aggregate must be one of {AGGREGATES}, got {self.prm_aggregate!r}")
        if self.maj_num_subsets < 1:
            raise ValueError(f"maj_num_subsets must be >= 1, got {self.maj_num_subsets}")
        if self.score_field is not None and not self.samples:
            raise ValueError(
                f"score_field {self.score_field!r} reads scores from a samples file: add --samples FILE (to score "
                "samples generated here, use --prm)"
            )
        if self.score_field is not None and self.prm:
            raise ValueError(
                f"score_field {self.score_field!r} and prm {self.prm!r} both give the samples' scores: use one"
            )

    def unused_with_samples(self, fields) -> list[str]:
        """Those of `fields` (the ones a config file or a flag set) that `--samples` does not read: re-grading
        existing generations reads no dataset, generates nothing (n, sampling, backend), and renders prompts (model,
        prompt_*) only for a PRM, for records that lack theirs."""
        used = _READ_WITH_SAMPLES | (_READ_WITH_SAMPLES_AND_PRM if self.prm else set())
        return sorted(name for name in fields if name not in used and name in self.__dataclass_fields__)


# What `align eval --samples FILE` reads (align.evaluation.harness.regrade_samples); the other fields are for
# generating samples.
_READ_WITH_SAMPLES = {
    "samples",
    "output_dir",
    "seed",
    "maj_num_subsets",
    "plot",
    "progress",
    "grader_workers",
    "grading_timeout",
    "prm",
    "prm_ref",
    "prm_aggregate",
    "prm_beta",
    "prm_batch_size",
    "score_field",
}
_READ_WITH_SAMPLES_AND_PRM = {"model", "prompt_style", "prompt_instruction"}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
