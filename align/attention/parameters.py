"""Learnable per-(layer, head) parameters of entropy-regularized attention: thresholds theta and temperatures t.

Jha & Reagen 2025 (Algorithm 1) learn the target entropy theta * E_max per head, theta in (0, 1) through a sigmoid;
their SM(t) divides attention logits by a learned temperature, here t = exp(rho) per (layer, head), starting at 1.

The parameters live in one small module attached to the policy (`attach`), so the optimizer, DDP, DeepSpeed and
FSDP treat them like any other parameter. They are kept out of the model's state dict (saved models stay plain
transformers checkpoints) and persisted instead as `attention_entropy.safetensors` (`save` / `load`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn


PARAMETERS_FILE = "attention_entropy.safetensors"
# Name of the submodule on the policy (also what weight decay and state dicts filter on).
MODULE_NAME = "attention_entropy"
# Name of the attribute an attention module carries when learnable per-head parameters are attached to it.
PARAMETERS_ATTRIBUTE = "_align_attention_entropy"


class AttentionEntropyParameters(nn.Module):
    """Learnable per-(layer, head) thresholds theta = sigmoid(threshold_logits) and log-temperatures.

    Left out of state dicts on purpose (see the module docstring); `save`/`load` persist them.
    """

    def __init__(self, num_layers: int, num_heads: int, threshold_init: float | None, learn_temperature: bool):
        super().__init__()
        self.threshold_logits = None
        self.log_temperature = None
        if threshold_init is not None:
            logit = math.log(threshold_init / (1 - threshold_init))
            self.threshold_logits = nn.Parameter(torch.full((num_layers, num_heads), logit))
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.zeros(num_layers, num_heads))

    def thresholds(self) -> torch.Tensor:
        return torch.sigmoid(self.threshold_logits)

    def forward(self) -> torch.Tensor:
        """theta, read through a module call.

        DeepSpeed ZeRO-3 gathers a partitioned parameter only inside the forward of the module that owns it.
        """
        return self.thresholds()

    def temperature(self, layer: int) -> torch.Tensor | None:
        return None if self.log_temperature is None else torch.exp(self.log_temperature[layer])

    def attach(self, model: nn.Module, attention_modules: list[nn.Module]) -> None:
        """Make these parameters a submodule of `model` and visible to each of its attention modules.

        The attention modules get a plain reference (not a submodule), so the parameters are registered once.
        """
        model.add_module(MODULE_NAME, self)
        for module in attention_modules:
            object.__setattr__(module, PARAMETERS_ATTRIBUTE, self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # persisted in PARAMETERS_FILE instead, so saved models stay loadable by plain transformers

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        pass

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {name: _full_tensor(param) for name, param in self.named_parameters()}

    def save(
        self, directory: str | os.PathLike, settings: dict, tensors: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write `directory/attention_entropy.safetensors` (`tensors`: `named_tensors()`, gathered by every rank)."""
        from safetensors.torch import save_file

        path = Path(directory) / PARAMETERS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.named_tensors() if tensors is None else tensors
        tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in tensors.items()}
        save_file(tensors, str(path), metadata={"settings": json.dumps(settings)})
        return path

    def load(self, directory: str | os.PathLike) -> bool:
        """Restore from `directory/attention_entropy.safetensors`; False (with a warning) if there is none."""
        from safetensors.torch import load_file

        path = Path(directory) / PARAMETERS_FILE
        if not path.is_file():
            warnings.warn(
                f"{path} not found: attention-entropy parameters restart from their initial values.", stacklevel=2
            )
            return False
        saved = load_file(str(path))
        for name, param in self.named_parameters():
            if name not in saved or saved[name].shape != param.shape:
                raise ValueError(
                    f"{path}: parameter {name!r} has shape {tuple(saved[name].shape) if name in saved else None}, "
                    f"this run expects {tuple(param.shape)}. Resume with the same model and attention-entropy "
                    "settings."
                )
            with torch.no_grad():
                param.copy_(saved[name].to(param.dtype))
        return True


def attached_temperature(module: nn.Module) -> torch.Tensor | None:
    """(heads,) temperatures of an attention module's layer, or None when none are attached or learned."""
    parameters = getattr(module, PARAMETERS_ATTRIBUTE, None)
    return parameters.temperature(module.layer_idx) if parameters is not None else None


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter, under FSDP2 (DTensor) or DeepSpeed ZeRO-3 (partitioned) too."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor()
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param
