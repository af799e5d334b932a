"""What every model deployment runs on: loading, LoRA, step progress and cancel, metrics, messages."""
