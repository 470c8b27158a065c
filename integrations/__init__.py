"""Built-in integrations, one file per model family; importing this package registers them."""

from .base import Integration
from .llava import LlavaIntegration

__all__ = ["Integration", "LlavaIntegration"]
