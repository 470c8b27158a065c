"""Built-in stages, one file each; importing this package registers them."""

from .base import Stage
from .cdpruner import CDPruner
from .cls_attn import ClsAttn
from .dart import Dart
from .decode_topk import DecodeTopK
from .dycoke import DyCoke
from .dycoke_decode import DyCokeKV
from .fastv import FastV
from .hiprune import HiPrune
from .holitom import HoliTom
from .holitom_inner import HoliTomLLM
from .kcenter import KCenter
from .longtail import LongTail
from .mustdrop import MustDropFilter
from .mustdrop_cache import MustDropCache
from .mustdrop_merge import MustDropMerge
from .pixel_shuffle import PixelShuffle
from .pool import Pool
from .random import RandomKeep
from .repshift import RepShift
from .sparsevlm import SparseVLM
from .transprune import TransPrune
from .visionzip import VisionZip
from .vscan import VScanScan

__all__ = ["Stage", "CDPruner", "ClsAttn", "Dart", "DecodeTopK", "DyCoke", "DyCokeKV", "FastV", "HiPrune", "HoliTom",
           "HoliTomLLM", "KCenter", "LongTail", "MustDropCache", "MustDropFilter", "MustDropMerge", "PixelShuffle",
           "Pool", "RandomKeep", "RepShift", "SparseVLM", "TransPrune", "VisionZip", "VScanScan"]
