"""Generation: `megaspec.generate`, its step-by-step form, and the tokenizers the CLI reads text with."""

from megaspec.generation.generate import Generation, Step, generate, new_cache
from megaspec.generation.sampling import Sampler

__all__ = ["Generation", "Sampler", "Step", "generate", "new_cache"]
