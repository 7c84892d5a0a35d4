"""Moving models between megaspec and other libraries (`megaspec.interop.hf` for HF transformers).

Nothing here is imported by the core: each sub-package imports its library lazily,
so megaspec works without it installed.
"""
