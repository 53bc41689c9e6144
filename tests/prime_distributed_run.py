"""One PRIME run for tests/test_prime_distributed.py, under `accelerate launch` (2 processes) or plain `python`.

    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml --num_processes 2 \\
        tests/prime_distributed_run.py MODEL_DIR OUTPUT_DIR --per-device-batch 2

GRPO samples its completions, and sampling depends on how the batch is split over processes (each rank draws from
its own generator state). Here generation is replaced by a deterministic function of (global step, the prompt's token
ids, the completion's index within its group of K copies): filler tokens, then "The answer is \\boxed{a}." where `a`
is the arithmetic problem's answer or a wrong one, then EOS, all drawn from a generator seeded by a hash of those
three. The copy index is counted over the prompts of every process (gathered in rank order, which is the order of the
1-process batch), so a completion does not depend on which rank generates it. Everything after generation is the
real trainer: the verifier's outcomes, the PRM's token rewards and its CE step (gradients all-reduced by hand), the
gather of the token rewards, PRIME's advantages and the policy step.

Writes to OUTPUT_DIR (rank 0): trainer_state.json (log history), fingerprints.json (per rank: float64 sum, abs-sum
and sum of squares of every parameter of the policy and of the PRM, full parameters under ZeRO-3), and with
ALIGN_VERIFY_SYNC=1 align's own sync_check.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("ALIGN_PRECISION", "fp32")

import torch  # noqa: E402


PROBLEM = re.compile(r"What is \$(-?\d+) ([-+*]) (-?\d+)\$")


def problem_answer(prompt_text: str) -> int:
    """The answer of the synthetic arithmetic problem rendered in `prompt_text` ("What is $61 - 14$?")."""
    match = PROBLEM.search(prompt_text)
    if match is None:
        raise ValueError(f"no arithmetic problem in the prompt {prompt_text!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def seed_of(step: int, prompt_ids, copy: int) -> int:
    key = f"{step}|{','.join(map(str, prompt_ids))}|{copy}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def build_trainer_class():
    from accelerate.utils import gather_object

    from align.trainers.prime import PrimeGRPOTrainer

    class DeterministicPrime(PrimeGRPOTrainer):
        """PRIME whose completions are a function of (step, prompt, copy index), not of the process layout."""

        def _filler_ids(self) -> list[int]:
            if not hasattr(self, "_filler"):
                tokenizer = self.processing_class
                special = set(tokenizer.all_special_ids)
                self._filler = [
                    i
                    for i in range(len(tokenizer))
                    if i not in special and re.fullmatch(r"[A-Za-z ]+", tokenizer.decode([i]) or "")
                ]
            return self._filler

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            tokenizer = self.processing_class
            local = [list(map(int, ids)) for ids in prompt_ids]
            everyone = gather_object(local)  # rank order = the 1-process batch's order
            first = self.accelerator.process_index * len(local)
            if everyone[first : first + len(local)] != local:
                raise RuntimeError("the gathered prompts do not hold this rank's prompts at its slice")
            seen: dict[tuple, int] = {}
            copies = []
            for ids in everyone:
                key = tuple(ids)
                copies.append(seen.get(key, 0))
                seen[key] = copies[-1] + 1
            filler = self._filler_ids()
            step = self.state.global_step
            completions = []
            for offset, ids in enumerate(local):
                generator = torch.Generator().manual_seed(seed_of(step, ids, copies[first + offset]))
                answer = problem_answer(tokenizer.decode(ids))
                length = int(torch.randint(2, 9, (1,), generator=generator))
                body = [filler[int(j)] for j in torch.randint(len(filler), (length,), generator=generator)]
                right = bool(torch.randint(2, (1,), generator=generator))
                value = answer if right else answer + 1 + int(torch.randint(9, (1,), generator=generator))
                tail = tokenizer(f" The answer is \\boxed{{{value}}}.", add_special_tokens=False)["input_ids"]
                completions.append(body + tail + [tokenizer.eos_token_id])
            return completions, None

    return DeterministicPrime


def fingerprint(model, gather_zero3: bool) -> dict[str, list[float]]:
    """name -> [sum, abs-sum, sum of squares] in float64, of every parameter."""
    from contextlib import nullcontext

    context = nullcontext()
    if gather_zero3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with context, torch.no_grad():
        result = {}
        for name, param in model.named_parameters():
            data = param.detach().to(torch.float64).cpu()
            result[name] = [data.sum().item(), data.abs().sum().item(), (data * data).sum().item()]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--accuracy-filter", action="store_true")
    parser.add_argument("--num-problems", type=int, default=32)
    options = parser.parse_args(argv)

    from datasets import Dataset

    from align.cli import exit_without_teardown
    from align.data.synthetic import generate_problems
    from align.data.training import prompt_rows
    from align.distributed import DistributedSanityCallback
    from align.trainers.prime import PrimeConfig

    args = PrimeConfig(
        output_dir=options.output_dir,
        max_steps=options.steps,
        per_device_train_batch_size=options.per_device_batch,
        num_generations=options.num_generations,
        max_completion_length=32,
        learning_rate=1e-3,
        prm_learning_rate=1e-3,
        use_process_rewards=True,
        accuracy_filter=options.accuracy_filter,
        grader_workers=1,
        seed=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    dataset = Dataset.from_list(prompt_rows(generate_problems(options.num_problems, "train", levels=(1,), seed=0)))
    trainer = build_trainer_class()(model=options.model_dir, args=args, train_dataset=dataset)
    trainer.add_callback(DistributedSanityCallback(trainer))
    trainer.train()

    accelerator = trainer.accelerator
    state = accelerator.state
    zero3 = state.distributed_type.value == "DEEPSPEED" and state.deepspeed_plugin.zero_stage == 3
    prints = {
        "policy": fingerprint(accelerator.unwrap_model(trainer.model), zero3),
        "prm": fingerprint(trainer.prm, False),  # replicated, never handed to DeepSpeed
    }
    everyone = [None] * accelerator.num_processes
    if accelerator.num_processes > 1:
        torch.distributed.all_gather_object(everyone, prints)
    else:
        everyone = [prints]
    if accelerator.is_main_process:
        out = Path(options.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        (out / "fingerprints.json").write_text(json.dumps({"world_size": len(everyone), "ranks": everyone}))
    accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown()  # see align.cli: gloo/DeepSpeed teardown can abort a finished rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
