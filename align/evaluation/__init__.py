"""The pass@N evaluation harness (`align eval`), one job per module.

- `config`: `EvalConfig` / `SamplingRunArguments`, the options of `align eval` and `align data`;
- `generation`: what a backend is given and returns; `hf_backend`, `vllm_backend`: the in-process engines;
  `openai_backend` (`openai_client`: HTTP, retries, errors): an OpenAI-compatible server; `sampling_params`: the
  request fields vLLM and servers share; `backends`: the registry by name, `auto`, and the engines' options;
  `sampling`: per-sequence seeded sampling;
- `sample_and_grade`: problems -> graded records in one process; `grouping`: verdicts and answer groups;
- `runs`: run directories, resumable and sharded over processes; `scoring`: implicit-PRM scores, or scores read
  from a samples file (`--score-field`);
- `records`: the samples.jsonl format; `estimators`: pass@k, pass^k, maj@k, bon@k; `report`, `plots`: summary.json
  and curves; `bootstrap`: percentile-bootstrap intervals over problems; `paired`: paired comparison of two runs;
- `harness`: `run_eval` and `regrade_samples`, the pipeline end to end;
- `exact_coverage`: pass@N without sampling (p of the canonical completion by one forward pass), `exact_coverage_run`
  its run directory (`--exact-coverage`); `callback`: exact and sampled pass@k during training (`callback_arguments`:
  its `align train` options).
"""
