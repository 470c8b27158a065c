"""vtoken: training-free visual token pruning and merging for vision-language models.

    import vtoken
    vtoken.wrap(model, "dart", keep=64)      # in place; returns the model
    model.generate(...)                       # runs with 64 visual tokens per image
    model.vtoken.stats                        # tokens in/out and time per stage, last call
    vtoken.unwrap(model)                      # exactly the original model again
"""

from . import stages  # noqa: F401  (importing it registers the built-in stages)
from .api import build_pipeline, unwrap, wrap, wrapped
from .pipeline import Pipeline
from .registry import list_methods, list_models, register_integration, register_stage
from .sites import Site
from .stages import ClsAttn, Dart, FastV, KCenter, PixelShuffle, Pool, RandomKeep, RepShift, Stage
from .stats import Stats
from .tokens import Keep, TokenSet

__version__ = "0.1.0"

__all__ = [
    "wrap", "unwrap", "wrapped", "build_pipeline", "Pipeline", "list_methods", "list_models",
    "register_stage", "register_integration", "Site", "Stage", "TokenSet", "Keep", "Stats",
    "ClsAttn", "Dart", "FastV", "KCenter", "PixelShuffle", "Pool", "RandomKeep", "RepShift",
]
