"""Fine-tuning pieces: config, data, LoRA, losses, checkpoints, trainer, export (driven by the repo's train.py)."""
