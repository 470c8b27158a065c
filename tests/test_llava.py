"""LLaVA-1.5 integration: the invariants of DESIGN.md on a tiny random-init model."""

from __future__ import annotations

import pytest
import torch

import vtoken
from integrations_helpers import lm_inputs
from tiny_models import BOS, IMAGE_TOKEN, TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava

METHODS = ["cls_attn", "kcenter", "dart", "random", "pool", "cls_attn+kcenter"]


def all_hooks(model):
    return {
        (name, kind, key)
        for name, module in model.named_modules()
        for kind in ("_forward_pre_hooks", "_forward_hooks")
        for key in getattr(module, kind)
    }


def two_prompts():
    return [prompt_ids([20, 21], 1, [30, 31, 32, 33]), prompt_ids([22], 1, [34, 35])]


@pytest.mark.parametrize("method", METHODS)
def test_language_model_sees_exactly_keep_tokens_per_image(method):
    model = tiny_llava()
    batch = llava_batch([prompt_ids([20], 1, [30, 31])])
    text_tokens = batch["input_ids"].shape[1] - TOKENS_PER_IMAGE
    seen, handle = lm_inputs(model)
    with vtoken.wrapped(model, method, keep=64):
        with torch.no_grad():
            model(**batch)
    handle.remove()
    assert seen[0]["inputs_embeds"].shape[1] == text_tokens + 64, (
        f"{method}: the language model got {seen[0]['inputs_embeds'].shape[1] - text_tokens} image tokens, not 64"
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_runs_on_padded_batch(method, side):
    model = tiny_llava()
    batch = llava_batch(two_prompts(), side=side)
    with vtoken.wrapped(model, method, keep=64):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        stats = list(model.vtoken.stats.records)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"]), "prompt must come back unchanged"
    assert sum(r.tokens_out for r in stats if r.site == "projector") == 64
    # each stage reports what it chose among: the first all tokens, a later one what is left to it
    left = TOKENS_PER_IMAGE
    for record in stats:
        assert record.tokens_in == left, f"{record.stage} reports {record.tokens_in} tokens in, not {left}"
        left -= record.tokens_out


@pytest.mark.parametrize("method", ["kcenter", "pool", "cls_attn+kcenter"])
def test_keep_all_matches_unwrapped_logits(method, attn_implementation):
    model = tiny_llava(attn_implementation)
    batch = llava_batch(two_prompts())
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, method, keep=TOKENS_PER_IMAGE):
            got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


def test_keep_all_fraction_matches_unwrapped_generation(attn_implementation):
    model = tiny_llava(attn_implementation)
    batch = llava_batch(two_prompts())
    expected = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with vtoken.wrapped(model, "dart", keep=1.0):
        got = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_unwrap_restores_model_exactly():
    model = tiny_llava()
    batch = llava_batch(two_prompts())
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**batch).logits
    hooks_before = all_hooks(model)  # transformers installs its own output-capturing hooks lazily
    vtoken.wrap(model, "cls_attn+kcenter", keep=32)
    with torch.no_grad():
        pruned = model(**batch).logits
    assert pruned.shape[1] < expected.shape[1]
    vtoken.unwrap(model)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(after, expected)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"parameter {name} changed"
    assert all_hooks(model) == hooks_before, "vtoken left a hook behind"
    assert "generate" not in model.__dict__ and not hasattr(model, "vtoken")


@pytest.mark.parametrize("method", ["dart", "cls_attn", "kcenter", "pool"])
def test_batch_equals_members_alone(method):
    # generate() continues right-padded rows after their padding, so batched generation is left-padded
    model = tiny_llava()
    prompts = two_prompts()
    batch = llava_batch(prompts, side="left", seed=5)
    with vtoken.wrapped(model, method, keep=48):
        together = model.generate(**batch, max_new_tokens=5, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = llava_batch([prompt], seed=5)
            alone["pixel_values"] = batch["pixel_values"][row : row + 1]
            single = model.generate(**alone, max_new_tokens=5, do_sample=False)
            assert torch.equal(together[row, -5:], single[0, -5:]), f"row {row} differs from its run alone"


def test_batch_logits_equal_members_alone_right_padding():
    model = tiny_llava()
    prompts = two_prompts()
    batch = llava_batch(prompts, side="right", seed=2)
    with vtoken.wrapped(model, "kcenter", keep=40), torch.no_grad():
        together = model(**batch).logits
        for row, prompt in enumerate(prompts):
            alone = llava_batch([prompt], seed=2)
            alone["pixel_values"] = batch["pixel_values"][row : row + 1]
            single = model(**alone).logits[0]
            torch.testing.assert_close(together[row, : single.shape[0]], single, atol=1e-5, rtol=1e-5)


def test_several_images_in_one_prompt():
    model = tiny_llava()
    batch = llava_batch([prompt_ids([20], 2, [30, 31]), prompt_ids([21, 22], 1, [32])], side="left")
    assert batch["pixel_values"].shape[0] == 3
    seen, handle = lm_inputs(model)
    with vtoken.wrapped(model, "dart", keep=16):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    handle.remove()
    lengths = seen[0]["attention_mask"].sum(1).tolist()
    text = (batch["input_ids"] != IMAGE_TOKEN).logical_and(batch["attention_mask"].bool()).sum(1).tolist()
    assert lengths == [text[0] + 2 * 16, text[1] + 16]
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_original_positions_keep_each_tokens_position():
    model = tiny_llava()
    batch = llava_batch([prompt_ids([20, 21], 1, [30])])
    seen, handle = lm_inputs(model)
    with vtoken.wrapped(model, "random", keep=10, positions="original"), torch.no_grad():
        model(**batch)
    handle.remove()
    positions = seen[0]["position_ids"][0]
    image_start = batch["input_ids"][0].tolist().index(IMAGE_TOKEN)
    assert positions[:image_start].tolist() == list(range(image_start))
    kept_image = positions[image_start : image_start + 10]
    assert bool((kept_image >= image_start).all()) and bool((kept_image < image_start + TOKENS_PER_IMAGE).all())
    assert positions[-1].item() == batch["input_ids"].shape[1] - 1, "the last text token keeps its position"


def test_original_positions_keep_all_matches_unwrapped(attn_implementation):
    model = tiny_llava(attn_implementation)
    batch = llava_batch(two_prompts())
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with vtoken.wrapped(model, "kcenter", keep=1.0, positions="original"):
        got = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


def test_labels_shrink_with_the_sequence():
    model = tiny_llava()
    batch = llava_batch([prompt_ids([20], 1, [30, 31])])
    labels = batch["input_ids"].clone()
    labels[labels == IMAGE_TOKEN] = -100
    with vtoken.wrapped(model, "pool", keep=36), torch.no_grad():
        out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - TOKENS_PER_IMAGE + 36


def test_stats_report_each_stage():
    model = tiny_llava()
    with vtoken.wrapped(model, "cls_attn+kcenter", keep=64), torch.no_grad():
        model(**llava_batch([prompt_ids([20], 1, [30])]))
        records = {r.stage: r for r in model.vtoken.stats.records}
    assert records["cls_attn"].tokens_out == 32 and records["kcenter"].tokens_out == 32
    assert records["cls_attn"].tokens_in == TOKENS_PER_IMAGE
    assert records["cls_attn"].scoring_ms >= 0 and records["kcenter"].select_ms > 0


def test_text_only_forward_passes_through():
    model = tiny_llava()
    ids = torch.tensor([[BOS, 20, 21, 22]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with vtoken.wrapped(model, "dart", keep=8):
            got = model(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_from_pretrained_folder_roundtrip(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava()
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = llava_batch([prompt_ids([20], 1, [30])])
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(loaded, "kcenter", keep=TOKENS_PER_IMAGE):
            got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_threads_capture_only_their_own_encoder_layers_for_projector_scores():
    """cls_attn at the projector reads a vision layer's input through a hook on a module every thread
    shares: each call must see its own images, never another thread's (one call's store was once
    overwritten by a concurrent forward)."""
    import threading

    model = tiny_llava()
    batches = [llava_batch([prompt_ids([20], 1, [30, 31])], seed=seed) for seed in range(3)]
    vtoken.wrap(model, "cls_attn", keep=12)
    with torch.no_grad():
        alone = [(model(**batch).logits, list(model.vtoken.stats.kept["projector"])) for batch in batches]
    results: dict[tuple[int, int], tuple] = {}
    barrier = threading.Barrier(len(batches))

    def worker(i: int) -> None:
        barrier.wait()
        for n in range(4):
            with torch.no_grad():
                results[i, n] = model(**batches[i]).logits
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    vtoken.unwrap(model)
    assert len(results) == 4 * len(batches)
    for (i, n), logits in results.items():
        torch.testing.assert_close(logits, alone[i][0], atol=1e-5, rtol=1e-5, msg=f"thread {i}, call {n}")
