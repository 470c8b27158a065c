"""Synthetic scenes with templated one-word questions: the offline accuracy benchmark's data.

Every image is 336 x 336 RGB (LLaVA-1.5's input size: 24 x 24 patches of 14 x 14 pixels) and is made
from one integer seed, with numpy and PIL only, so the same seed gives the same pixels and the same
questions on any machine. A scene is a textured background (noise, stripes or faint soft blobs, all of
low saturation and contrast) and 1 to 8 objects: a shape (circle, square, triangle, star, cross) in a
colour (red, green, blue, yellow, purple, orange, white) and a size (large, medium, small; a small object
sits on one patch and spills into at most one neighbour). No two objects share both colour and shape,
so "the red star" always names one object.

Question categories (each answer is one word):

- ``color``:    "what color is the star?" (asked only when exactly one star is present)
- ``count``:    "how many red objects are there?" / "how many stars are there?" (0 included)
- ``exists``:   "is there a red star?" yes/no; negatives are adversarial (POPE-style): the absent
                object shares its colour or its shape with an object that is present
- ``position``: "is the red star left of the blue circle?" (yes/no), "is the red star above the blue
                circle?" (yes/no), "is the red star left or right of the blue circle?" and "which side
                is the red star on?" (left/right); asked only when the answer is clear by a margin
- ``small``:    "what color is the small star?" / "what shape is the small red object?" about a small
                object that the description names uniquely

Splits use disjoint seed ranges: training scenes have seeds in ``[0, HELDOUT_BASE)``, held-out scenes
``HELDOUT_BASE + i``. ``heldout_set(n)`` is deterministic: one question per scene, categories in turn.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (150, 60, 195),
    "orange": (245, 135, 25),
    "white": (242, 242, 242),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("large", "medium", "small")
#: object diameter range in pixels, per size
DIAMETERS = {"large": (72, 92), "medium": (40, 54), "small": (16, 19)}
CATEGORIES = ("color", "count", "exists", "position", "small")
NUMBERS = tuple(str(i) for i in range(9))

HELDOUT_BASE = 1_000_000_000  # training seeds are below, held-out seeds from here on
SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down (anti-aliasing, coverage masks)
LR_MARGIN = 24  # pixels between centres before "left of" / "above" is asked
SIDE_MARGIN = 36  # pixels from the vertical midline before "which side" is asked


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float
    diameter: float
    angle: float  # degrees, rotation of squares/triangles/stars/crosses

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    seed: int
    objects: list[SceneObject]
    background: str

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "background": self.background, "objects": [asdict(o) for o in self.objects]}


# --- drawing ---------------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    a = math.radians(angle)

    def rot(px: float, py: float) -> tuple[float, float]:
        return (cx + px * math.cos(a) - py * math.sin(a), cy + px * math.sin(a) + py * math.cos(a))

    if shape == "square":
        s = radius * 0.86
        return [rot(-s, -s), rot(s, -s), rot(s, s), rot(-s, s)]
    if shape == "triangle":
        return [rot(radius * math.sin(t), -radius * math.cos(t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.45
            t = i * math.pi / 5
            points.append(rot(r * math.sin(t), -r * math.cos(t)))
        return points
    if shape == "cross":
        w, r = radius * 0.36, radius
        outline = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                   (-r, -w), (-w, -w)]
        return [rot(px, py) for px, py in outline]
    raise ValueError(f"unknown shape {shape!r}")


def _local_mask(obj: SceneObject, size: int = IMAGE_SIZE) -> tuple[np.ndarray, slice, slice]:
    """Coverage of the pixels around ``obj`` in [0, 1] (anti-aliased) and where they are in the image."""
    s = SUPERSAMPLE
    radius = obj.diameter / 2
    # draw only the object's neighbourhood at s x, box-filtered down
    x0, y0 = int(math.floor(obj.x - radius - 2)), int(math.floor(obj.y - radius - 2))
    x1, y1 = int(math.ceil(obj.x + radius + 2)), int(math.ceil(obj.y + radius + 2))
    w, h = x1 - x0, y1 - y0
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = (obj.x - x0) * s, (obj.y - y0) * s
    if obj.shape == "circle":
        r = radius * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, radius * s, obj.angle), fill=255)
    local = np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
    ys, xs = slice(max(y0, 0), min(y1, size)), slice(max(x0, 0), min(x1, size))
    return local[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0], ys, xs


def object_mask(obj: SceneObject, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage of each pixel by ``obj`` in [0, 1] (float32, size x size), anti-aliased."""
    local, ys, xs = _local_mask(obj, size)
    mask = np.zeros((size, size), dtype=np.float32)
    mask[ys, xs] = local
    return mask


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A low-saturation textured background, float32 HxWx3 in [0, 255]."""
    n = IMAGE_SIZE
    base = rng.uniform(45, 125)
    tint = rng.normal(0, 8, size=3)
    image = np.empty((n, n, 3), dtype=np.float32)
    image[:] = (base + tint).astype(np.float32)
    kind = str(rng.choice(["noise", "stripes", "blobs", "gradient"]))
    yy, xx = np.ogrid[0:n, 0:n]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    if kind == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(8, 40)
        amplitude = rng.uniform(6, 16)
        wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period + rng.uniform(0, 6.3))
        image += (amplitude * wave)[..., None]
    elif kind == "blobs":
        layer = Image.new("L", (n, n), 128)
        draw = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(4, 12))):
            cx, cy = rng.uniform(0, n, size=2)
            rx, ry = rng.uniform(15, 70, size=2)
            shade = int(128 + rng.choice([-1, 1]) * rng.uniform(10, 22))
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=shade)
        layer = layer.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(4, 9))))
        offset = np.asarray(layer, dtype=np.float32) - 128.0
        image += offset[..., None] * (1 + rng.normal(0, 0.15, size=3)).astype(np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        ramp = (xx * math.cos(theta) + yy * math.sin(theta)) / n
        image += (rng.uniform(15, 35) * (ramp - ramp.mean()))[..., None]
    sigma = rng.uniform(3, 12) if kind == "noise" else rng.uniform(1, 5)
    image += np.float32(sigma) * rng.standard_normal(size=(n, n, 1), dtype=np.float32)
    image += np.float32(sigma * 0.3) * rng.standard_normal(size=(n, n, 3), dtype=np.float32)
    return np.clip(image, 0, 160, out=image), kind


def _place_objects(rng: np.random.Generator, count: int) -> list[SceneObject]:
    # a small palette makes repeated colours and shapes (and so counting) common
    palette = [str(c) for c in rng.choice(COLOR_NAMES, size=int(rng.integers(2, 6)), replace=False)]
    shapes = [str(c) for c in rng.choice(SHAPES, size=int(rng.integers(2, 6)), replace=False)]
    while len(palette) * len(shapes) < count:
        extra = [c for c in COLOR_NAMES if c not in palette]
        palette.append(extra[int(rng.integers(len(extra)))])
    combos = [(c, s) for c in palette for s in shapes]
    order = rng.permutation(len(combos))[:count]
    objects: list[SceneObject] = []
    for index in order:
        color, shape = combos[int(index)]
        for _ in range(200):
            size = str(rng.choice(SIZES, p=[0.25, 0.4, 0.35]))
            if size == "large" and sum(o.size == "large" for o in objects) >= 2:
                size = "medium"
            diameter = float(rng.uniform(*DIAMETERS[size]))
            margin = diameter / 2 + 4
            if size == "small":
                # centre on a patch along one axis so the object covers one patch and at most one more
                gx, gy = rng.integers(1, GRID - 1, size=2)
                x, y = (gx + 0.5) * PATCH, (gy + 0.5) * PATCH
                if rng.random() < 0.5:
                    x += rng.uniform(-PATCH / 2, PATCH / 2)
                else:
                    y += rng.uniform(-PATCH / 2, PATCH / 2)
            else:
                x, y = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
            clear = all(math.hypot(x - o.x, y - o.y) > (diameter + o.diameter) / 2 + 8 for o in objects)
            if clear and margin <= x <= IMAGE_SIZE - margin and margin <= y <= IMAGE_SIZE - margin:
                angle = float(rng.uniform(-20, 20)) if shape != "circle" else 0.0
                objects.append(SceneObject(shape, color, size, round(float(x), 2), round(float(y), 2),
                                           round(diameter, 2), round(angle, 2)))
                break
    return objects


def make_scene(
    seed: int, with_masks: bool = False
) -> tuple[Image.Image, Scene] | tuple[Image.Image, Scene, list[np.ndarray]]:
    """The image and objects of scene ``seed`` (and each object's coverage mask if ``with_masks``)."""
    rng = np.random.default_rng([int(seed), 7])
    background, kind = _background(rng)
    count = int(rng.choice(np.arange(1, 9), p=[0.08, 0.12, 0.14, 0.15, 0.15, 0.14, 0.12, 0.10]))
    objects = _place_objects(rng, count)
    image = background
    masks = []
    for obj in objects:
        local, ys, xs = _local_mask(obj)
        colour = np.array(COLORS[obj.color], dtype=np.float32) + rng.normal(0, 8, size=3).astype(np.float32)
        shade = 1.0 + rng.normal(0, 0.04)
        alpha = local[..., None]
        image[ys, xs] = image[ys, xs] * (1 - alpha) + np.clip(colour * shade, 0, 255) * alpha
        if with_masks:
            mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
            mask[ys, xs] = local
            masks.append(mask)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    scene = Scene(seed=int(seed), objects=objects, background=kind)
    if with_masks:
        return Image.fromarray(pixels, "RGB"), scene, masks
    return Image.fromarray(pixels, "RGB"), scene


def patch_labels(scene: Scene, masks: list[np.ndarray], min_cover: float = 0.2) -> np.ndarray:
    """Per 14 x 14 patch: index into ``scene.objects`` of the object covering most of it, or -1.

    (GRID, GRID) int array; an object must cover at least ``min_cover`` of the patch. Used by training
    for a dense auxiliary objective.
    """
    labels = np.full((GRID, GRID), -1, dtype=np.int64)
    if not masks:
        return labels
    cover = np.stack([m.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)) for m in masks])
    best = cover.argmax(axis=0)
    labels[cover.max(axis=0) >= min_cover] = best[cover.max(axis=0) >= min_cover]
    return labels


# --- questions -------------------------------------------------------------------------------------
def _q(question: str, answer: str, category: str, objects: Iterable[int] = ()) -> dict[str, Any]:
    # "objects": indices into scene.objects of what the question refers to (in the order named; for
    # count and exists, every object that matches); questions_for drops it unless asked
    return {"question": question, "answer": answer, "category": category, "objects": list(objects)}


def color_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if not unique:
        return []
    obj = unique[int(rng.integers(len(unique)))]
    template = ["what color is the {}?", "what is the color of the {}?"][int(rng.integers(2))]
    return [_q(template.format(obj.shape), obj.color, "color", [scene.objects.index(obj)])]


def count_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    present_colors = sorted({o.color for o in scene.objects})
    present_shapes = sorted({o.shape for o in scene.objects})
    by_color = rng.random() < 0.5
    if rng.random() < 0.15:  # an absent colour or shape: the answer is 0
        pool = [c for c in COLOR_NAMES if c not in present_colors] if by_color else \
            [s for s in SHAPES if s not in present_shapes]
    else:
        pool = present_colors if by_color else present_shapes
    if not pool:
        return []
    value = str(pool[int(rng.integers(len(pool)))])
    if by_color:
        match = [i for i, o in enumerate(scene.objects) if o.color == value]
        return [_q(f"how many {value} objects are there?", str(len(match)), "count", match)]
    match = [i for i, o in enumerate(scene.objects) if o.shape == value]
    return [_q(f"how many {PLURALS[value]} are there?", str(len(match)), "count", match)]


def exists_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = sorted(present)[int(rng.integers(len(present)))]
        index = next(i for i, o in enumerate(scene.objects) if (o.color, o.shape) == (color, shape))
        return [_q(f"is there a {color} {shape}?", "yes", "exists", [index])]
    # adversarial negative: shares its colour or its shape with an object that is present
    tricky = sorted({(c, s) for (pc, ps) in present for c in COLOR_NAMES for s in SHAPES
                     if (c == pc or s == ps) and (c, s) not in present})
    if not tricky:
        tricky = sorted({(c, s) for c in COLOR_NAMES for s in SHAPES} - present)
    color, shape = tricky[int(rng.integers(len(tricky)))]
    return [_q(f"is there a {color} {shape}?", "no", "exists")]


def position_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    objects = scene.objects
    candidates = []
    for a in objects:
        if abs(a.x - IMAGE_SIZE / 2) >= SIDE_MARGIN:
            side = "left" if a.x < IMAGE_SIZE / 2 else "right"
            candidates.append(("side", a, None, side))
        for b in objects:
            if a is b:
                continue
            if abs(a.x - b.x) >= LR_MARGIN:
                candidates.append(("lr", a, b, "left" if a.x < b.x else "right"))
            if abs(a.y - b.y) >= LR_MARGIN:
                candidates.append(("ud", a, b, "above" if a.y < b.y else "below"))
    if not candidates:
        return []
    kind, a, b, truth = candidates[int(rng.integers(len(candidates)))]
    refs = [objects.index(a)] + ([objects.index(b)] if b is not None else [])
    if kind == "side":
        return [_q(f"which side is the {a.name} on?", truth, "position", refs)]
    if kind == "lr" and rng.random() < 1 / 3:
        return [_q(f"is the {a.name} left or right of the {b.name}?", truth, "position", refs)]
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    answer = "yes" if rng.random() < 0.5 else "no"
    asked = truth if answer == "yes" else opposite[truth]
    relation = f"{asked} of" if kind == "lr" else asked
    return [_q(f"is the {a.name} {relation} the {b.name}?", answer, "position", refs)]


def small_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    small = [o for o in scene.objects if o.size == "small"]
    options = []
    for o in small:
        index = [scene.objects.index(o)]
        if sum(p.shape == o.shape for p in small) == 1:
            options.append(_q(f"what color is the small {o.shape}?", o.color, "small", index))
        if sum(p.color == o.color for p in small) == 1:
            options.append(_q(f"what shape is the small {o.color} object?", o.shape, "small", index))
    if not options:
        return []
    return [options[int(rng.integers(len(options)))]]


GENERATORS = {"color": color_questions, "count": count_questions, "exists": exists_questions,
              "position": position_questions, "small": small_questions}


def questions_for(scene: Scene, rng: np.random.Generator | int | None = None,
                  categories: Iterable[str] = CATEGORIES, with_objects: bool = False) -> list[dict[str, Any]]:
    """At most one question per category for ``scene`` (categories the scene cannot support are skipped).

    Each item is ``{"question", "answer", "category"}``; the answer is one lower-case word. With
    ``with_objects`` it also has ``"objects"``: the indices in ``scene.objects`` of the objects the
    question names (in order), or for count and exists, of every object that matches.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng([scene.seed, 11] if rng is None else [int(rng)])
    out = []
    for category in categories:
        for item in GENERATORS[category](scene, rng):
            if not with_objects:
                item.pop("objects")
            out.append(item)
    return out


def scene_seed(split: str, index: int) -> int:
    """Seed of scene ``index`` of ``split`` ("train" or "heldout"); the two ranges are disjoint."""
    if split == "train":
        if not 0 <= index < HELDOUT_BASE:
            raise ValueError(f"train scene index out of range: {index}")
        return int(index)
    if split == "heldout":
        if index < 0:
            raise ValueError(f"held-out scene index out of range: {index}")
        return HELDOUT_BASE + int(index)
    raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")


def split_of(seed: int) -> str:
    return "train" if 0 <= seed < HELDOUT_BASE else "heldout"


def heldout_set(n: int = 1000, categories: Iterable[str] = CATEGORIES) -> list[dict[str, Any]]:
    """``n`` held-out questions, one per scene, the categories taking turns (so they are balanced).

    Each item: ``{"id", "seed", "question", "answer", "category"}``; the image is ``make_scene(seed)[0]``.
    """
    categories = tuple(categories)
    items: list[dict[str, Any]] = []
    index = 0
    while len(items) < n:
        category = categories[len(items) % len(categories)]
        seed = scene_seed("heldout", index)
        index += 1
        _, scene = make_scene(seed)
        found = questions_for(scene, np.random.default_rng([seed, 13]), categories=[category])
        if not found:
            continue
        items.append({"id": f"heldout-{seed - HELDOUT_BASE:06d}", "seed": seed, **found[0]})
    return items


def save_heldout(path: str | Path, n: int = 1000, images_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Write the held-out set as JSON (and, if ``images_dir`` is given, each scene as ``<id>.png``)."""
    items = heldout_set(n)
    if images_dir is not None:
        images_dir = Path(images_dir)
        images_dir.mkdir(parents=True, exist_ok=True)
        for item in items:
            make_scene(item["seed"])[0].save(images_dir / f"{item['id']}.png")
            item["image"] = f"{item['id']}.png"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(items, indent=1))
    return items


def vocabulary() -> list[str]:
    """Every word a question, an answer or the prompt can contain (the tokenizer's word list)."""
    words = {"USER", "ASSISTANT", ":", "?", "what", "color", "is", "the", "of", "how", "many", "objects",
             "object", "are", "there", "a", "left", "right", "above", "below", "or", "which", "side", "on",
             "small", "shape", "yes", "no"}
    words |= set(SHAPES) | set(PLURALS.values()) | set(COLOR_NAMES) | set(NUMBERS)
    return sorted(words)
