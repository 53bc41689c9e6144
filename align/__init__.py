"""align: train LLMs to reason and to be aligned, on top of transformers, TRL, PEFT, Accelerate and DeepSpeed."""

__version__ = "0.1.0"
