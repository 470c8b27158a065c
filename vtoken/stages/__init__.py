"""Built-in stages, one file each; importing this package registers them."""

from .base import Stage
from .cls_attn import ClsAttn
from .dart import Dart
from .fastv import FastV
from .kcenter import KCenter
from .pixel_shuffle import PixelShuffle
from .pool import Pool
from .random import RandomKeep
from .repshift import RepShift

__all__ = ["Stage", "ClsAttn", "Dart", "FastV", "KCenter", "PixelShuffle", "Pool", "RandomKeep", "RepShift"]
