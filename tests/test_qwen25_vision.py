"""vision(L) inside Qwen2.5-VL's windowed tower: whole merge groups pruned, the window partition kept.

The reference runs the tower's blocks by hand in float64 on the patches in raster-group order (not the
model's window order), with dense attention masks built from each patch's place: same frame at a
full-attention block, same frame and same window at a window block. From block L on it holds only the
kept merge groups. Selections are recomputed from the reference's own signals where the stage is
deterministic (repshift, cls_attn)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tiny_models import qwen_batch, tiny_qwen

#: patch grids (h, w): 3 x 5 merge groups (partial windows at the right and bottom), 2 x 4, 4 x 6
SIZES = [[20, ("image", 6, 10), 30, 31], [21, ("image", 4, 8), 32], [22, 23, ("image", 8, 12), 33]]


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _linear(x, layer):
    return torch.nn.functional.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())


def _layout(visual, grid_thw):
    """Per patch of the tower's input (raster-group order): frame id, window id, (row, column)."""
    merge, side = visual.spatial_merge_size, visual.window_size // visual.spatial_merge_size // visual.patch_size
    frames, windows, rows, cols = [], [], [], []
    frame_id = window_base = 0
    for t, h, w in grid_thw.tolist():
        across = -(-(w // merge) // side)
        for _ in range(t):
            for gr in range(h // merge):
                for gc in range(w // merge):
                    for a in range(merge):
                        for b in range(merge):
                            frames.append(frame_id)
                            windows.append(window_base + (gr // side) * across + gc // side)
                            rows.append(gr * merge + a)
                            cols.append(gc * merge + b)
            frame_id += 1
            window_base += -(-(h // merge) // side) * across
    return (torch.tensor(frames), torch.tensor(windows), torch.tensor(rows), torch.tensor(cols))


def _rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]


def reference_tower(model, pixels, grid_thw, choices, shuffle=None):
    """The merged features of the kept groups per frame (ascending group index) and the kept groups per
    site. ``choices[L](signals, groups)``: after block L, with the block's signals per frame over the
    frame's live groups ``groups`` (their original indices), the positions (into those) to keep.
    ``shuffle=(L, representatives)``: after block L (the first site) each 2x2 cell of groups becomes their
    slot-by-slot mean, at the place (rotary row, window) of the cell's representative group."""
    visual = model.model.visual
    unit = visual.spatial_merge_size ** 2
    with torch.no_grad():
        hidden = visual.patch_embed(pixels).double()
    frames, windows, rows, cols = _layout(visual, grid_thw)
    inv_freq = visual.rotary_pos_emb.inv_freq.double()
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], -1)
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()
    frame_start = torch.tensor([0] + torch.bincount(frames).cumsum(0).tolist()) // unit
    alive = torch.arange(hidden.shape[0])
    kept = {}
    for number, block in enumerate(visual.blocks):
        full = number in visual.fullatt_block_indexes
        same = frames[alive][:, None] == frames[alive][None]
        if not full:
            same &= windows[alive][:, None] == windows[alive][None]
        x = _rms(hidden, block.norm1.weight)
        n, heads = x.shape[0], block.attn.num_heads
        q, k, v = _linear(x, block.attn.qkv).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = (_rotate(t, cos[alive], sin[alive]) for t in (q, k))
        scores = torch.einsum("qhd,khd->hqk", q, k) * block.attn.head_dim ** -0.5
        probs = scores.masked_fill(~same, float("-inf")).softmax(-1)
        attended = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
        hidden = hidden + _linear(attended, block.attn.proj)
        mlp = block.mlp
        normed = _rms(hidden, block.norm2.weight)
        update = _linear(torch.nn.functional.silu(_linear(normed, mlp.gate_proj)) * _linear(normed, mlp.up_proj),
                         mlp.down_proj)
        hidden = hidden + update
        if shuffle is not None and number == shuffle[0]:
            hidden, alive = _shuffle_cells(hidden, grid_thw, unit, shuffle[1])
            kept[number] = shuffle[1]
        if number in choices:
            received = (probs.mean(0) * same).sum(0) / same.sum(1)  # / the key's segment size (its queries)
            frame = frames[alive].view(-1, unit)[:, 0]
            group = alive.view(-1, unit)[:, 0] // unit - frame_start[frame]  # original index in the frame
            per_group = {"mlp_shift": update.norm(dim=-1).view(-1, unit).mean(1),
                         "cls_attn": received.view(-1, unit).mean(1)}
            live = range(int(frames.max()) + 1)
            signals = {name: [value[frame == f] for f in live] for name, value in per_group.items()}
            groups = [group[frame == f].tolist() for f in live]
            positions = choices[number](signals, groups)
            kept[number] = [[groups[f][p] for p in positions[f]] for f in live]
            rows_kept = torch.cat([torch.nonzero(frame == f)[:, 0][torch.as_tensor(positions[f], dtype=torch.long)]
                                   for f in live])
            keep = (rows_kept[:, None] * unit + torch.arange(unit)).reshape(-1)
            hidden, alive = hidden[keep], alive[keep]
    merger = visual.merger
    merged = _rms(hidden, merger.ln_q.weight).view(-1, unit * hidden.shape[-1])
    merged = _linear(torch.nn.functional.gelu(_linear(merged, merger.mlp[0])), merger.mlp[2])
    last = kept[max(kept)]
    return list(torch.split(merged, [len(c) for c in last])), kept


def _shuffle_cells(hidden, grid_thw, unit, representatives):
    """Every frame's 2x2 cells of merge groups averaged slot by slot; each takes its representative's rows."""
    groups = hidden.view(-1, unit, hidden.shape[-1])
    merged, rows, start, frame = [], [], 0, 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // 2, w // 2
        for _ in range(t):
            cells = [[(2 * i + a) * gw + 2 * j + b for a in range(2) for b in range(2)]
                     for i in range(gh // 2) for j in range(gw // 2)]
            for cell, representative in zip(cells, representatives[frame], strict=True):
                assert representative in cell
                merged.append(groups[[start + g for g in cell]].mean(0))
                rows.append((start + representative) * unit + torch.arange(unit))
            start += gh * gw
            frame += 1
    return torch.cat(merged), torch.cat(rows)


def replay(groups_kept):
    """A choice that keeps the given original groups per frame."""
    return lambda signals, groups: [[groups[f].index(g) for g in kept] for f, kept in enumerate(groups_kept)]


def wrapped_tower(model, batch, method, options):
    """The tower's merged output per image as the wrapped model hands it on (the last site's kept groups,
    in index order), and the kept groups of every site."""
    seen = []
    with vtoken.wrapped(model, method, **options):
        handle = model.model.visual.register_forward_hook(lambda module, args, output: seen.append(output))
        with torch.no_grad():
            model(**batch)
        handle.remove()
        kept = {site: [index.tolist() for index in value] for site, value in model.vtoken.stats.kept.items()}
    last = kept[list(kept)[-1]]
    return list(torch.split(seen[0].pooler_output, [len(index) for index in last])), kept


def top(name, k):
    """The k largest signal values per frame, ties to the lower index, in index order."""
    def choose(signals, groups):
        return [sorted(sorted(range(len(v)), key=lambda i: (-float(v[i].detach()), i))[:k]) for v in signals[name]]
    return choose


@pytest.mark.parametrize("method,options,layer,signal", [
    ("repshift", dict(keep=5, layer=0), 0, "mlp_shift"),   # after a window block
    ("repshift", dict(keep=3, layer=2), 2, "mlp_shift"),   # a window block after a full one
    ("cls_attn", dict(keep=4, site="vision(1)"), 1, "cls_attn"),  # received attention over the whole image
    ("cls_attn", dict(keep=4, site="vision(0)"), 0, "cls_attn"),  # ... within windows
])
def test_selection_and_features_equal_the_hand_written_tower(method, options, layer, signal):
    model = tiny_qwen("2.5")
    batch = qwen_batch(SIZES, seed=3)
    expected, chosen = reference_tower(model, batch["pixel_values"], batch["image_grid_thw"],
                                       {layer: top(signal, options["keep"])})
    got, kept = wrapped_tower(model, batch, method, options)
    assert list(kept.values()) == [chosen[layer]]
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine.double(), reference, atol=1e-5, rtol=1e-5)


def test_two_sites_a_replayed_choice_then_repshift_on_the_survivors():
    """kcenter at vision(0) (a window block), repshift at vision(2) among its survivors: the second choice
    equals the reference's on its own signals, the features its run on the groups left."""
    model = tiny_qwen("2.5")
    batch = qwen_batch(SIZES, seed=11)
    pipeline = vtoken.Pipeline([vtoken.KCenter(keep=6, site="vision(0)"), vtoken.RepShift(keep=4, layer=2)])
    got, kept = wrapped_tower(model, batch, pipeline, {})
    expected, chosen = reference_tower(model, batch["pixel_values"], batch["image_grid_thw"],
                                       {0: replay(kept["vision(0)"]), 2: top("mlp_shift", 4)})
    assert kept["vision(2)"] == chosen[2] and all(len(index) == 4 for index in chosen[2])
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine.double(), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_pixel_shuffle_merged_groups_stay_at_their_representatives_place(layer):
    """pixel_shuffle after a window block (0) and a full-attention block (1): the later blocks run the
    merged groups at their representatives' rotary rows and windows, as the reference does."""
    model = tiny_qwen("2.5")
    batch = qwen_batch([[20, ("image", 8, 12), 30], [21, ("image", 4, 8), 32]], seed=13)
    got, kept = wrapped_tower(model, batch, "pixel_shuffle", dict(layer=layer))
    representatives = kept[f"vision({layer})"]
    assert [len(r) for r in representatives] == [6, 2]
    expected, _ = reference_tower(model, batch["pixel_values"], batch["image_grid_thw"], {},
                                  shuffle=(layer, representatives))
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine.double(), reference, atol=1e-5, rtol=1e-5)


def test_a_stage_choice_replayed_by_hand_and_video_frames():
    """kcenter's choice (any choice) at a window block, on an image with partial windows and on a
    3-frame clip (each frame a segment with its own windows and budget): the tower called on its own
    gives the features of the reference's run on the same groups."""
    model = tiny_qwen("2.5")
    batch = qwen_batch([[20, ("image", 6, 10), 30], [21, ("video", 3, 4, 6), 32]], seed=5)
    for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        seen = []
        with vtoken.wrapped(model, "kcenter", keep=3, site="vision(2)"):
            handle = model.model.visual.register_forward_hook(lambda module, args, output, seen=seen:
                                                              seen.append(output))
            with torch.no_grad():
                model.model.visual(batch[key], grid_thw=batch[grid_key])
            handle.remove()
            kept = model.vtoken.stats.kept["vision(2)"]
        frame_groups = int(batch[grid_key][0, 1:].prod()) // 4
        per_frame = [(index - frame * frame_groups).tolist() for frame, index in enumerate(kept)]
        expected, chosen = reference_tower(model, batch[key], batch[grid_key], {2: replay(per_frame)})
        chosen = chosen[2]
        assert [len(c) for c in chosen] == [3] * int(batch[grid_key][0, 0]), "every frame keeps its budget"
        pooled = seen[0].pooler_output
        assert pooled.shape[0] == sum(len(c) for c in chosen)
        for mine, reference in zip(torch.split(pooled, [len(c) for c in chosen]), expected):
            torch.testing.assert_close(mine.double(), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,options", [
    ("pixel_shuffle", dict(layer=0, ratio=1)), ("kcenter", dict(keep=1.0, site="vision(0)")),
    ("repshift", dict(keep=1.0, layer=1)), ("cls_attn", dict(keep=1.0, site="vision(2)")),
])
def test_keep_all_equals_unwrapped(method, options, attn):
    model = tiny_qwen("2.5", attn)
    batch = qwen_batch(SIZES)
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, method, **options):
            got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


def test_later_blocks_see_shrunk_windows_and_frames():
    """After vision(0) the window block 2 gets each window's kept groups, the full block 3 each image's."""
    model = tiny_qwen("2.5")
    batch = qwen_batch(SIZES[:2])
    seen = {}
    with vtoken.wrapped(model, "repshift", keep=3, layer=0):
        handles = [model.model.visual.blocks[b].register_forward_pre_hook(
            lambda module, args, kwargs, b=b: seen.update({b: kwargs["cu_seqlens"].tolist()}), with_kwargs=True)
            for b in (2, 3)]
        with torch.no_grad():
            model(**batch)
        for handle in handles:
            handle.remove()
        kept = model.vtoken.stats.kept["vision(0)"]
    assert seen[3] == [0, 12, 24], "full-attention blocks: 3 groups of 4 patches per image"
    side = 2  # window_size 8 / patch 2 / merge 2
    windows = []
    for index, (_, _, w) in zip(kept, batch["image_grid_thw"].tolist()):
        across = -(-(w // 2) // side)
        ids = [(i // (w // 2)) // side * across + (i % (w // 2)) // side for i in index.tolist()]
        windows += [ids.count(window) * 4 for window in sorted(set(ids))]
    assert seen[2] == torch.tensor([0] + windows).cumsum(0).tolist()


def test_padded_batch_generate_equals_rows_alone_and_recomputation():
    """Three images of different sizes in one left-padded batch: the kept groups and the last logits of
    each row equal the row run alone; generate with the cache equals generate recomputing every step."""
    model = tiny_qwen("2.5")
    batch = qwen_batch(SIZES, seed=7)
    with vtoken.wrapped(model, "repshift", keep=4, layer=1):
        with torch.no_grad():
            cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
            recomputed = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
            logits = model(**batch).logits
            kept = model.vtoken.stats.kept["vision(1)"]
            for row, spec in enumerate(SIZES):
                single = qwen_batch([spec], seed=7)
                single["pixel_values"] = _row_pixels(batch, row)
                alone = model(**single).logits
                assert torch.equal(model.vtoken.stats.kept["vision(1)"][0], kept[row])
                torch.testing.assert_close(logits[row, -1], alone[0, -1], atol=1e-5, rtol=0)
    assert torch.equal(cached, recomputed)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 4
    assert [k.numel() for k in kept] == [4, 4, 4]


def _row_pixels(batch, row):
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    start = sum(sizes[:row])
    return batch["pixel_values"][start : start + sizes[row]]


def test_unwrap_restores_the_tower():
    model = tiny_qwen("2.5")
    batch = qwen_batch(SIZES[1:])  # pixel_shuffle needs even merged grids
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "pixel_shuffle", layer=1):
            model(**batch)
        assert torch.equal(model(**batch).logits, expected)


def test_a_changed_tower_forward_is_refused(monkeypatch):
    from vtoken.integrations import qwen25_windows

    monkeypatch.setattr(qwen25_windows, "WINDOW_FORWARD_STEPS", ("a statement no forward has",))
    with pytest.raises(ValueError, match="no longer has 'a statement no forward has'"):
        vtoken.wrap(tiny_qwen("2.5"), "pixel_shuffle", layer=0)
