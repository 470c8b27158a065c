"""The kept-token overlay: which image patch ended up in which visual token, drawn over the image."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vtoken.sites import Site

OVERLAY_WIDTH = 448


def trace_tokens(sites: list[Site], kept: dict[str, list], merged: dict[str, list], patches: int) -> np.ndarray:
    """For every patch of the image's grid, the visual token it ends up in (0..k-1), or -1 if dropped.

    Follows the sites in forward order: a selection at a vision or projector site records original patch
    positions; one at an llm site records positions among the visual tokens that reached it, one at the
    decode site positions among those that entered the decoder (its choice is made over the whole cache); a
    merge records, for each token that reached it, the merged token it went to.
    """
    owner = np.arange(patches)  # token of each patch
    positions = np.arange(patches)  # patch position of each current token (centre for merges)
    entering = None  # the tokens that entered the decoder: a decode site's choices count among them
    for site in sites:
        if site.kind in ("llm", "decode") and entering is None:
            entering = owner, positions
        if site.kind == "decode":
            alive = owner >= 0  # survivors of the llm(K) sites; the choice re-traces from the decoder input
            owner, positions = np.where(alive, entering[0], -1), entering[1]
        rows = kept.get(str(site))
        if not rows or rows[0] is None:
            continue
        chosen = rows[0].numpy().astype(np.int64)
        groups = merged.get(str(site))
        alive = owner >= 0
        if groups and groups[0] is not None:
            assign = groups[0].numpy().astype(np.int64)
            owner = np.where(alive, assign[np.clip(owner, 0, None)], -1)
            positions = chosen
            continue
        if site.kind in ("llm", "decode"):
            token_of = chosen  # positions into the current tokens
        else:
            where = {int(p): t for t, p in enumerate(positions)}
            token_of = np.array([where[int(p)] for p in chosen if int(p) in where], dtype=np.int64)
        remap = np.full(len(positions), -1, dtype=np.int64)
        remap[token_of] = np.arange(len(token_of))
        owner = np.where(alive, remap[np.clip(owner, 0, None)], -1)
        positions = positions[token_of]
    return owner


def model_view(image: Image.Image, processor: Any, family: Any) -> Image.Image:
    """The part of the image the model's patch grid covers, as its processor prepares it (resized and
    centre-cropped for fixed-size encoders such as CLIP, whole for native-resolution ones such as
    Qwen2-VL's): the family's integration says (``Integration.overlay_view``); the whole image when it
    does not."""
    try:
        return family.overlay_view(image, processor)
    except NotImplementedError:
        return image


def group_colours(count: int) -> np.ndarray:
    """``count`` well-separated RGB colours (golden-ratio hues), uint8 ``[count, 3]``."""
    colours = [colorsys.hsv_to_rgb((0.13 + i * 0.618033988749895) % 1.0, 0.75, 1.0) for i in range(count)]
    return (np.array(colours, dtype=np.float32).reshape(-1, 3) * 255).astype(np.uint8)


def render_overlay(view: Image.Image, grid: tuple[int, int], owner: np.ndarray, merging: bool,
                   width: int = OVERLAY_WIDTH) -> Image.Image:
    """Kept patches bright, dropped ones dimmed; with merging, each merged token's patches in one colour."""
    rows, cols = grid
    cell = max(4, round(width / cols))
    base = np.asarray(view.convert("RGB").resize((cols * cell, rows * cell), Image.BICUBIC), dtype=np.float32)
    owner_px = np.repeat(np.repeat(owner.reshape(rows, cols), cell, axis=0), cell, axis=1)
    kept = owner_px >= 0
    grey = base.mean(axis=-1, keepdims=True)
    out = np.where(kept[..., None], base, (0.4 * base + 0.6 * grey) * 0.28)
    if merging and kept.any():
        colours = group_colours(int(owner.max()) + 1).astype(np.float32)
        tint = colours[np.clip(owner_px, 0, None)]
        out = np.where(kept[..., None], 0.6 * base + 0.4 * tint, out)
        edge = np.zeros_like(kept)
        edge[:, 1:] |= owner_px[:, 1:] != owner_px[:, :-1]
        edge[1:, :] |= owner_px[1:, :] != owner_px[:-1, :]
        out[edge] = 255.0
    else:  # a faint grid over the kept patches shows the token size
        line = np.zeros_like(kept)
        line[::cell, :] = True
        line[:, ::cell] = True
        out = np.where((line & kept)[..., None], 0.75 * out + 0.25 * 255.0, out)
    picture = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    ImageDraw.Draw(picture).rectangle([0, 0, picture.width - 1, picture.height - 1], outline=(90, 90, 90))
    return picture


def legend_text(owner: np.ndarray, grid: tuple[int, int], merging: bool, sites: list[Site]) -> str:
    patches = grid[0] * grid[1]
    tokens = int(owner.max()) + 1 if (owner >= 0).any() else 0
    alive = int((owner >= 0).sum())
    where = ", ".join(str(s) for s in sites)
    if merging:
        text = (f"{patches} visual tokens ({grid[0]}x{grid[1]} grid) merged into {tokens} at {where}: each colour "
                f"is one merged token")
        if alive < patches:
            text += f"; the dimmed ones ({patches - alive}) were dropped"
        return text
    text = (f"{tokens} of {patches} visual tokens ({grid[0]}x{grid[1]} grid) kept at {where}: kept bright, "
            f"dropped dimmed")
    if any(s.kind == "llm" for s in sites):
        text += " (the first decoder layers still see every token)"
    return text
