"""The built-in models (one file per family) and what they share: outputs, masks, losses.

`megaspec.catalog` imports the families to register them.
"""

from megaspec.models.output import ModelOutput

__all__ = ["ModelOutput"]
