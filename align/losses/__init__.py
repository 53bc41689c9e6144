"""Pure tensor functions: no model, no trainer state. Each is tested against closed-form values."""
