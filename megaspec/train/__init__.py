"""`megaspec train`: a small, complete training entry point (data, AdamW, metrics, DCP checkpoints)."""

from megaspec.train.loop import train

__all__ = ["train"]
