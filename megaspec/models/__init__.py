"""The built-in models; importing this package registers them all."""

from megaspec.models import gpt  # noqa: F401  (imported for registration)
from megaspec.models.output import ModelOutput

__all__ = ["ModelOutput"]
