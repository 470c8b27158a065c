"""Which patches Representation Shift keeps on the embedded scenes model, and why.

For held-out scenes, at each encoder block L the tower's per-patch shifts are read with forward hooks:
the MLP update (the paper's default and vtoken's ``repshift``), the attention update, and the whole
block's update (output - input). For a budget of K patches the script reports, per score, how much of
the objects the top-K patches cover (object recall: object patches kept / object patches; small-object
recall alike) and the share of kept patches that lie on an object (precision); the bottom-K of the MLP
shift and the random expectation are the references. Objects: ``eval.scenes.patch_labels`` (a patch
with >= 20 % coverage by one object).

    .venv/bin/python scripts/repshift_study.py --scenes 200 --keep 64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from vtoken.eval import scenes, scenes_model


def shifts(model, processor, image) -> dict[str, torch.Tensor]:
    """Per block and kind ('mlp', 'attn', 'block'): the L2 norm of each patch's update, [layers, 576]."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    seen: dict[str, list] = {"mlp": [], "attn": [], "in": [], "out": []}
    handles = []
    for layer in layers:
        handles.append(layer.mlp.register_forward_hook(lambda m, a, out: seen["mlp"].append(out[0])))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, out: seen["attn"].append(out[0][0])))
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs: seen["in"].append((args[0] if args else kwargs["hidden_states"])[0]),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, out: seen["out"].append((out[0] if isinstance(out, tuple) else out)[0])))
    try:
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            tower(pixel_values=pixels)
    finally:
        for handle in handles:
            handle.remove()
    norms = {
        "mlp": torch.stack([x[1:].norm(dim=-1) for x in seen["mlp"]]),
        "attn": torch.stack([x[1:].norm(dim=-1) for x in seen["attn"]]),
        "block": torch.stack([(o - i)[1:].norm(dim=-1) for i, o in zip(seen["in"], seen["out"])]),
    }
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--keep", type=int, default=64)
    args = parser.parse_args()
    model, processor = scenes_model.load()
    layers = model.config.vision_config.num_hidden_layers
    scores = ("mlp", "attn", "block")
    # totals[(score, order, layer)] = [object kept, object total, small kept, small total, kept on object]
    totals: dict[tuple, np.ndarray] = {}
    background_mean = {s: np.zeros(layers) for s in scores}
    object_mean = {s: np.zeros(layers) for s in scores}
    for index in range(args.scenes):
        image, scene, masks = scenes.make_scene(scenes.scene_seed("heldout", index), with_masks=True)
        labels = scenes.patch_labels(scene, masks).reshape(-1)
        on_object = labels >= 0
        small = np.isin(labels, [i for i, o in enumerate(scene.objects) if o.size == "small"])
        norms = shifts(model, processor, image)
        for score in scores:
            for layer in range(layers):
                values = norms[score][layer].numpy()
                object_mean[score][layer] += values[on_object].mean() if on_object.any() else 0
                background_mean[score][layer] += values[~on_object].mean()
                for order in ("top", "bottom"):
                    ranked = np.argsort(-values if order == "top" else values, kind="stable")[: args.keep]
                    kept = np.zeros_like(on_object)
                    kept[ranked] = True
                    row = totals.setdefault((score, order, layer), np.zeros(5))
                    row += [(kept & on_object).sum(), on_object.sum(), (kept & small).sum(), small.sum(),
                            (kept & on_object).sum()]
    n = args.scenes
    print(f"{n} held-out scenes, keep {args.keep} of 576 patches; random keeps {args.keep / 576:.1%} of every set")
    print(f"{'score':6} {'order':6} {'block':5} {'object recall':>13} {'small recall':>12} {'kept on objects':>15}")
    for (score, order, layer), row in sorted(totals.items()):
        print(f"{score:6} {order:6} {layer:5d} {row[0] / row[1]:13.1%} {row[2] / max(row[3], 1):12.1%} "
              f"{row[4] / (n * args.keep):15.1%}")
    print("mean shift on object / background patches, per block:")
    for score in scores:
        ratios = " ".join(f"{object_mean[score][i] / background_mean[score][i]:.2f}" for i in range(layers))
        print(f"  {score:6} {ratios}")


if __name__ == "__main__":
    main()
