"""gpu.jsonl (one JSON line per check, written as each finishes) and gpu.md (the table, rewritten after each check),
so that a run cut short still leaves every finished check behind."""

from __future__ import annotations

import json
from pathlib import Path


COLUMNS = ("check", "status", "ratio vs baseline", "tokens/s", "peak memory (MiB)", "wall (s)", "setting / reason")


def _numbers(values: dict | None, digits: int | None = None) -> str:
    if not values:
        return ""
    return ", ".join(f"{name} {value if digits is None else round(value, digits)}" for name, value in values.items())


def row(record: dict) -> list[str]:
    ratios = _numbers(record.get("ratios"))
    if ratios and record.get("baseline"):
        ratios = f"{ratios} (vs {record['baseline']})"
    rates = record.get("tokens_per_s") or (
        {f"{k} samples/s": v for k, v in record["samples_per_s"].items()} if "samples_per_s" in record else None
    )
    memory = _numbers(record.get("peak_mib"))
    if memory and record.get("memory", "").startswith("peak RSS"):
        memory += " (RSS)"
    detail = record.get("setting", "")
    if record.get("kernel"):
        detail += f"; kernel {record['kernel']} ({record.get('attn_implementation')})"
    if "max_relative_loss_difference" in record:
        detail += f"; losses within {record['max_relative_loss_difference']:.2%} of the plain run's"
    if record["status"] != "ok":
        detail = record.get("reason") or record.get("error", "")
    cells = [record["check"], record["status"], ratios, _numbers(rates), memory, f"{record['wall_s']:.1f}", detail]
    return [str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells]


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(record)) + " |" for record in records]
    return "\n".join(lines)


def header(environment: dict, mode: str) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in environment["packages"].items() if version)
    gpu = environment["gpu"]
    device = gpu.get("nvidia_smi") or gpu.get("name") or "no GPU"
    lines = [
        f"# GPU kit: {mode}",
        "",
        f"- date: {environment['date']}",
        f"- device: {device} (torch CUDA {gpu.get('torch_cuda')})",
        f"- Python {environment['python']} on {environment['machine']}, torch threads: {environment['cpu_threads']}",
        f"- packages: {packages}",
    ]
    if environment["requirement_mismatches"]:
        lines.append(f"- requirements not met: {'; '.join(environment['requirement_mismatches'])}")
    return "\n".join(lines)


class Report:
    def __init__(self, out_dir: Path, environment: dict, mode: str):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.environment, self.mode, self.records = environment, mode, []
        self.jsonl = self.out_dir / "gpu.jsonl"
        self.jsonl.write_text(json.dumps({"check": "environment", "status": "ok", **environment}) + "\n")
        self.write_markdown()

    def add(self, record: dict) -> None:
        self.records.append(record)
        with self.jsonl.open("a") as file:
            file.write(json.dumps(record) + "\n")
        self.write_markdown()

    def write_markdown(self) -> None:
        text = header(self.environment, self.mode) + "\n\n" + table(self.records) + "\n"
        (self.out_dir / "gpu.md").write_text(text)
