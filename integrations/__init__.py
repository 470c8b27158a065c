"""Built-in integrations, one file per model family; importing this package registers them."""

from .base import Integration
from .llava import LlavaIntegration
from .llava_next import LlavaNextIntegration
from .qwen2_vl import Qwen2VLIntegration

__all__ = ["Integration", "LlavaIntegration", "LlavaNextIntegration", "Qwen2VLIntegration"]
