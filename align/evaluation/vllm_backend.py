"""The `vllm` backend: offline `vllm.LLM` (vLLM is imported only when the backend is built)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import ClassVar

from align.evaluation.generation import Completion, GenerationBackend, SamplingConfig, encode_prompt
from align.evaluation.sampling_params import sampling_fields


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend(GenerationBackend):
    """Offline `vllm.LLM`; one `SamplingParams(n=...)` per prompt with a per-prompt seed.

    A PEFT adapter directory is served as a LoRA on top of its base model (`enable_lora=True`). The `options`
    (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `enforce_eager`) go to `vllm.LLM`
    unchanged; they are vLLM's engine arguments of the same names.
    """

    name = "vllm"
    options: ClassVar[dict[str, tuple[type, str]]] = {
        "tensor_parallel_size": (int, "GPUs the model is split across (tensor parallelism)"),
        "pipeline_parallel_size": (int, "pipeline stages the layers are split into"),
        "gpu_memory_utilization": (float, "fraction of GPU memory vLLM may use for weights and KV cache (0-1)"),
        "max_model_len": (int, "context length cap (prompt + completion), to fit the KV cache"),
        "enforce_eager": (bool, "no CUDA graphs (less memory, slower decoding)"),
        "max_num_seqs": (int, "sequences decoded concurrently"),
        "max_num_batched_tokens": (int, "tokens processed per engine step"),
        "enable_prefix_caching": (bool, "reuse the KV cache of a prompt shared by the n samples"),
        "cpu_offload_gb": (float, "GiB of weights kept in CPU memory"),
        "max_lora_rank": (int, "largest LoRA rank served (default: the adapter's, at least 8)"),
    }

    unavailable = "backend 'vllm' needs vLLM (GPU machines: pip install 'align[vllm]'); use --backend hf without it."

    @classmethod
    def available(cls) -> bool:
        return vllm_available()

    def __init__(self, model: str, *, dtype: str = "auto", batch_size: int | str = "auto", **llm_kwargs):
        from vllm import LLM

        from align.models import load_tokenizer, resolve_model_path

        path = resolve_model_path(model)
        adapter_config = Path(path) / "adapter_config.json"
        self.lora_request = None
        if adapter_config.is_file():
            from vllm.lora.request import LoRARequest

            adapter = json.loads(adapter_config.read_text())
            base = resolve_model_path(adapter["base_model_name_or_path"])
            llm_kwargs = {"enable_lora": True, "max_lora_rank": max(8, int(adapter.get("r", 8))), **llm_kwargs}
            self.lora_request = LoRARequest("align-adapter", 1, path)
            tokenizer_path = path if (Path(path) / "tokenizer_config.json").is_file() else base
            path = base
        else:
            tokenizer_path = path
        self.tokenizer = load_tokenizer(tokenizer_path)
        # vLLM batches internally (continuous batching); batch_size is how many prompts it is handed per call, and
        # `auto` hands it 64 prompts (enough to keep its scheduler full, few enough to write results often)
        self.batch_size = 64 if batch_size == "auto" else int(batch_size)
        self.dtype = dtype
        self.llm = LLM(model=path, tokenizer=tokenizer_path, dtype=dtype, **llm_kwargs)

    def prompts_per_call(self, n: int) -> int:
        return self.batch_size

    def engine(self) -> dict:
        return {"backend": self.name, "dtype": self.dtype, "prompts_per_call": self.batch_size}

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        # the fields the `openai` backend sends too (sampling_params.py): both engines sample alike
        params = [SamplingParams(**sampling_fields(sampling, prompt)) for prompt in prompts]
        # token ids, not text: vLLM would add a second BOS to a chat-templated prompt; this way both backends see
        # exactly the same tokens
        token_prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, prompt)} for prompt in prompts]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False, lora_request=self.lora_request)
        results = []
        for output in outputs:
            results.append(
                [
                    Completion(
                        text=choice.text,
                        num_tokens=len(choice.token_ids),
                        finish_reason="stop" if choice.finish_reason == "stop" else "length",
                    )
                    for choice in output.outputs
                ]
            )
        return results

    def close(self) -> None:
        self.llm = None
