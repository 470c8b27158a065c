"""Built-in integrations, one file per model family; importing this package registers them."""

from .base import Integration
from .internvl import InternVLIntegration
from .llava import LlavaIntegration
from .llava_next import LlavaNextIntegration
from .llava_onevision import LlavaOnevisionIntegration
from .open_clip_vit import OpenClipViTIntegration
from .qwen2_vl import Qwen2VLIntegration
from .qwen3_5 import Qwen3_5Integration
from .qwen3_vl import Qwen3VLIntegration
from .timm_vit import TimmViTIntegration

__all__ = [
    "Integration", "InternVLIntegration", "LlavaIntegration", "LlavaNextIntegration", "LlavaOnevisionIntegration",
    "OpenClipViTIntegration", "Qwen2VLIntegration",
    "Qwen3VLIntegration", "Qwen3_5Integration", "TimmViTIntegration",
]
