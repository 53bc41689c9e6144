"""Per-pair gradients of sequence log-probs and their geometry: ⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖².

g_w = ∇θ log π(y_w|x) and g_l = ∇θ log π(y_l|x), with log π summed over the response tokens, over a selected set of
parameters. Each response gets its own unpadded forward and its own `torch.autograd.grad`, so nothing accumulates into
`.grad` (DDP's reducer and the optimizer never see these gradients) and the gradients are exact per pair (a batched
backward would sum them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from align.log_probs import token_log_probs


def select_parameters(model: torch.nn.Module, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters to differentiate: all of them (`trainable`: LoRA under PEFT) or those whose name matches
    the regular expression `spec` (`re.search`)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters, so there is no gradient to diagnose.")
    if spec == "trainable":
        return trainable
    pattern = re.compile(spec)
    selected = [(name, p) for name, p in trainable if pattern.search(name)]
    if not selected:
        examples = ", ".join(name for name, _ in trainable[:5])
        raise ValueError(
            f"entanglement_params={spec!r} matches none of the {len(trainable)} trainable parameters (e.g. "
            f"{examples}). Use `trainable`, or a regular expression that matches some of these names."
        )
    return selected


def response_row(inputs: dict, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row `row` of a right-padded preference batch without its padding: (input_ids, completion_mask), 1-D."""
    length = int(inputs["attention_mask"][row].sum())
    return inputs["input_ids"][row, :length], inputs["completion_mask"][row, :length]


def sequence_logp(model: torch.nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) summed over the completion tokens of one unpadded sequence, through TRL's fused LM head."""
    log_probs, _ = token_log_probs(model, input_ids[None], completion_mask[None])
    return log_probs[0].sum()


@torch.no_grad()
def pair_logps(model: torch.nn.Module, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """`sequence_logp` of each (input_ids, completion_mask) row, without gradients."""
    return [float(sequence_logp(model, ids, mask)) for ids, mask in rows]


@contextmanager
def isolated_rng():
    """Run extra forwards without consuming the training RNG (dropout masks of the real step stay the same)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


@dataclass
class PairGeometry:
    """Per pair (1-D float64 tensors): the log-probs at which the gradients were taken, ⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖²."""

    logp_chosen: torch.Tensor
    logp_rejected: torch.Tensor
    inner: torch.Tensor
    chosen_norm_sq: torch.Tensor
    rejected_norm_sq: torch.Tensor

    def select(self, indices: Sequence[int]) -> PairGeometry:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return PairGeometry(*(getattr(self, f).index_select(0, index) for f in self.__dataclass_fields__))


def _flat_grads(value: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    # A parameter the sequence does not reach (e.g. an unused embedding) has a zero gradient.
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b, strict=True))


def pair_geometry(
    model: torch.nn.Module, inputs: dict, pairs: Iterable[int], params: list[torch.nn.Parameter]
) -> PairGeometry:
    """Gradient geometry of the given pairs (indices into the first half of a [chosen; rejected] batch).

    Cost per pair: two forwards and two backwards of one sequence.
    """
    return pair_gradients(model, inputs, pairs, params, keep=False)[0]


def pair_gradients(
    model: torch.nn.Module, inputs: dict, pairs: Iterable[int], params: list[torch.nn.Parameter], keep: bool = True
) -> tuple[PairGeometry, list[tuple[list[torch.Tensor], list[torch.Tensor]]]]:
    """`pair_geometry` and, with `keep`, the gradients themselves: (g_w, g_l) per pair, one tensor per parameter.

    The diagnostic keeps them until the optimizer has stepped, to project the real update Δθ on them (`update`).
    """
    num_pairs = inputs["input_ids"].size(0) // 2
    values = {name: [] for name in PairGeometry.__dataclass_fields__}
    kept = []
    for pair in pairs:
        logp_w = sequence_logp(model, *response_row(inputs, pair))
        grads_w = _flat_grads(logp_w, params)
        logp_l = sequence_logp(model, *response_row(inputs, pair + num_pairs))
        grads_l = _flat_grads(logp_l, params)
        values["logp_chosen"].append(logp_w.detach().double())
        values["logp_rejected"].append(logp_l.detach().double())
        values["inner"].append(_dot(grads_w, grads_l))
        values["chosen_norm_sq"].append(_dot(grads_w, grads_w))
        values["rejected_norm_sq"].append(_dot(grads_l, grads_l))
        if keep:
            kept.append(([g.detach().float() for g in grads_w], [g.detach().float() for g in grads_l]))
        del grads_w, grads_l
    return PairGeometry(**{name: torch.stack(v).cpu() for name, v in values.items()}), kept
