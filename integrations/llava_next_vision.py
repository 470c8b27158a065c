"""``vision(L)`` on LLaVA-NeXT: every view pruned in the CLIP tower, the packing kept.

The tower runs all views of all images of a batch (base views and AnyRes crops) as one batch of
``[views, 1 + h*w, D]``: from block L on each view holds [CLS] and the patch tokens the stages keep
(``vit_sites.EncoderSites``, the same hooks as LLaVA's), so the budget is per view, every view alike
(an int is tokens per view, a fraction of each view's patches), as a batched tower without masks
allows. A merging stage (pixel_shuffle, pool) leaves each view on its smaller grid.

The model's ``pack_image_features`` lays an image's views out on their full patch grids (the base
view, then the crop canvas unpadded to the image's aspect ratio, rows ended by ``image_newline``). So
the projector's output for the kept tokens is put back at their places on each view's full grid
(``scatter_to_grid``, a forward hook on the projector while the integration encodes images), the
model packs that as usual, and only the packed slots of kept tokens (a merged token at its
representative's place) reach the language model, with a row's newline while the row keeps a token,
as at the projector. Every kept token thus sits where the unpruned model puts it, and its feature is
the tower's run on the kept tokens from block L on: that is exact. A token kept in a crop's padding
(the part of the canvas that unpadding cuts off) is dropped by the packing, as the model drops the
patches there, so an image can reach the language model with fewer tokens than views x budget.

Refused with vision(L): ``cls_attn`` at the projector (its [CLS] rows would be read from blocks that
see only the kept tokens) and ``anyres_budget='guided'`` (the guidance reads the base view's full
score grid).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from vtoken import signals
from vtoken.sites import Site


def check_vision_options(integration) -> None:
    """Refuse what cannot follow ``vision(L)`` pruning on LLaVA-NeXT, naming the reason."""
    if "vision" not in integration.supported_site_kinds() or not any(
            site.kind == "vision" for site in integration.pipeline.sites):
        return  # no vision(L) here (a family built on this one may refuse the site itself)
    if integration.settings["anyres_budget"] == "guided":
        raise ValueError("anyres_budget='guided' reads the base view's full grid of scores, which vision(L) "
                         "pruning leaves incomplete; with vision(L) sites on llava_next pass anyres_budget="
                         "'global' or 'view'")
    if signals.CLS_ATTN in integration.pipeline.signals_at(Site("projector")):
        raise ValueError("on llava_next, cls_attn at the projector cannot follow vision(L) pruning; run "
                         "cls_attn at a vision(L) site instead")


def scatter_to_grid(encoder_sites, patches: int):
    """A forward hook for the projector: the projected kept tokens ``[views, k, D]`` put back at their
    original patch places on full ``[views, patches, D]`` grids (zeros elsewhere), for the model's
    packing. Only for forwards of the thread that made it (the projector is shared)."""
    owner = threading.get_ident()

    def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if threading.get_ident() != owner:
            return None
        index, _ = encoder_sites.result()
        if index is None or output.shape[1] == patches:
            return None
        full = output.new_zeros(output.shape[0], patches, output.shape[-1])
        return full.scatter(1, index[..., None].expand(-1, -1, output.shape[-1]), output)

    return hook


def kept_places(encoder_sites, patches: int) -> Tensor | None:
    """``[views, patches]`` bool (every view of the tower's batch): the patch places of the tokens the
    tower kept (a merged token's is its representative's); None when no vision(L) pruning ran."""
    index, _ = encoder_sites.result()
    if index is None:
        return None
    alive = torch.zeros(index.shape[0], patches, dtype=torch.bool, device=index.device)
    return alive.scatter(1, index, True)
