"""Thin TRL subclasses that call `align.losses` and `align.diagnostics` and log metrics."""
