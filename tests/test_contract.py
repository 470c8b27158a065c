"""The contract every integration keeps ("What must always hold" in DESIGN.md), on every registered one.

Each clause is one test function, parametrised over the cases of ``contract_models.CASES`` (one per
integration and model type) and each case's representative stage at each of its sites. A new integration
gets every clause by adding its case there; ``test_every_registered_integration_has_a_contract_case``
fails until it does.

Conventions the clauses rely on:
- VLMs: the batch has one image per row and rows of different prompt lengths. A pruned batch keeps the
  caller's padding side: a row's tokens (text and kept visual tokens, in order) lie together at the end
  of its row for left padding and at the start for right padding, so the last position of row r is
  ``-1`` (left) or ``n_r - 1`` (right), where ``n_r`` is the length of that row's output when run alone.
- Generation clauses run on left-padded batches (``generate`` continues right-padded rows after their
  padding) and apply to VLMs only; standalone ViTs get keep-all, unwrap, batch, threads, deepcopy, pickle.
  ``generate(use_cache=False)`` must really recompute: no forward call of the model may receive a filled
  KV cache (transformers itself forces the cache on when generation starts from ``inputs_embeds``).
- labels are ``input_ids`` with image placeholders and padding at -100; the text tokens survive pruning,
  so the reference loss is the cross-entropy of the returned logits against the text labels at the
  positions they hold after pruning (the layout above).
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F

import vtoken
from contract_models import ATTENTION, CASES, case_stages
from vtoken.registry import INTEGRATIONS, load_builtin_integrations

NEW_TOKENS = 4
ALL = case_stages()
VLM = case_stages(vlm=True)
SIDED = [pytest.param(case, stage, side, id=f"{param.id}-{side}")
         for param in ALL for case, stage in [param.values] for side in case.sides]

GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "beam2": dict(do_sample=False, num_beams=2),
    "sample_2_sequences": dict(do_sample=True, num_return_sequences=2),
    "beam2_2_sequences": dict(do_sample=False, num_beams=2, num_return_sequences=2),
    "dict_with_scores": dict(do_sample=False, return_dict_in_generate=True, output_scores=True),
}


# --- helpers -----------------------------------------------------------------------------------------
def wrap_stage(model, stage, keep_all: bool = False):
    """Wrap ``model`` with the stage's pruning options (or the options that keep every token)."""
    return vtoken.wrap(model, stage.method, **(stage.keep_all if keep_all else stage.prune))


def kept_record(model) -> dict:
    """What the last call kept, per site (``model.vtoken.stats.kept``), as an independent copy."""
    return {site: [k.clone() if torch.is_tensor(k) else copy.deepcopy(k) for k in rows]
            for site, rows in model.vtoken.stats.kept.items()}


def generate(model, inputs: dict, **options):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, **options)


def sequences(output) -> torch.Tensor:
    return output.sequences if hasattr(output, "sequences") else output


def cache_length(kwargs: dict) -> int:
    """How many positions the cache a forward call receives already holds (0: none)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def hooks(model) -> dict:
    """Every hook registered on every submodule (torch keeps them in dicts named ``*hooks*``), and the
    global module hooks."""
    found = {}
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if "hooks" in attribute and isinstance(value, dict) and value:
                found[(name, attribute)] = set(value)
    from torch.nn.modules import module as torch_module

    for attribute in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks"):
        value = getattr(torch_module, attribute, None)
        if value:
            found[("<global>", attribute)] = set(value)
    return found


def tensors(model) -> dict[str, torch.Tensor]:
    """Parameters, buffers (persistent or not) and the state dict, cloned."""
    out = {f"state:{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out.update({f"param:{k}": v.detach().clone() for k, v in model.named_parameters()})
    out.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return out


def row_last(logits: torch.Tensor, row: int, side: str, alone_length: int) -> torch.Tensor:
    """The last position of ``row`` in a batch output (see the module docstring)."""
    return logits[row, -1] if side == "left" else logits[row, alone_length - 1]


def assert_outputs_close(got: tuple, expected: tuple, atol: float, what: str) -> None:
    assert len(got) == len(expected), f"{what}: {len(got)} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, f"{what}: output {i} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        assert diff <= atol, f"{what}: output {i} differs by up to {diff:.3g} (atol {atol})"


def assert_outputs_equal(got: tuple, expected: tuple, what: str) -> None:
    assert_outputs_close(got, expected, 0.0, what)


def assert_kept_equal(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), (
        f"{what}: kept selection recorded for sites {sorted(got)}, expected {sorted(expected)}")
    for site in expected:
        assert len(got[site]) == len(expected[site]), (
            f"{what}: {len(got[site])} kept entries at {site}, expected {len(expected[site])}")
        for i, (a, b) in enumerate(zip(got[site], expected[site])):
            same = torch.equal(a.cpu(), b.cpu()) if torch.is_tensor(a) and torch.is_tensor(b) else a == b
            assert same, f"{what}: kept selection at {site}, entry {i}: {a} instead of {b}"


# --- the table covers every registered integration ----------------------------------------------------
def test_every_registered_integration_has_a_contract_case():
    """Every built-in integration, and every model type it claims, has a case in contract_models.CASES."""
    load_builtin_integrations()
    covered = {(case.integration, case.model_type) for case in CASES}
    missing = [f"{name} ({model_type})" for name, cls in INTEGRATIONS.items()
               if cls.__module__.startswith("vtoken.") for model_type in cls.model_types
               if (name, model_type) not in covered]
    assert not missing, f"registered integrations without a contract case in tests/contract_models.py: {missing}"
    unknown = [case.name for case in CASES if case.integration not in INTEGRATIONS]
    assert not unknown, f"contract cases name integrations that are not registered: {unknown}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_each_case_builds_a_model_its_integration_matches(case):
    load_builtin_integrations()
    model = case.model()
    assert INTEGRATIONS[case.integration].matches(model), f"{case.integration} does not match the {case.name} model"
    claimed = getattr(getattr(model, "config", None), "model_type", None)
    if claimed is not None:
        assert claimed == case.model_type, f"{case.name}: the model's type is {claimed!r}, not {case.model_type!r}"
    assert case.stages, f"{case.name} has no stage"


# --- 1. keep-all -------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case,stage", ALL)
def test_keep_all_matches_unwrapped_logits(case, stage, attn):
    model = case.model(attn)
    batch = case.batch("left")
    expected = case.run(model, batch)
    wrap_stage(model, stage, keep_all=True)
    got = case.run(model, batch)
    vtoken.unwrap(model)
    what = f"{case.name} {stage.id} keep-all ({stage.keep_all}, {attn})"
    if not case.vlm:
        assert_outputs_close(got, expected, 1e-5, what)
        return
    (got,), (expected,) = got, expected
    last = (got[:, -1] - expected[:, -1]).abs().max().item()
    assert last <= 1e-5, f"{what}: the last position's logits differ from the unwrapped model's by {last:.3g}"
    assert got.shape == expected.shape, (
        f"{what}: logits have shape {tuple(got.shape)}, the unwrapped model's {tuple(expected.shape)}")
    valid = batch["attention_mask"].bool()
    diff = (got[valid] - expected[valid]).abs().max().item()
    assert diff <= 1e-5, f"{what}: logits at the prompt's positions differ from the unwrapped model's by {diff:.3g}"


# --- 2. unwrap ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,stage", ALL)
def test_unwrap_restores_parameters_hooks_and_outputs(case, stage):
    model = case.model()
    batch = case.batch("left")
    expected = case.run(model, batch)  # libraries may add their own hooks lazily: snapshot after a first call
    expected_generation = generate(model, batch, do_sample=False) if case.vlm else None
    before_tensors, before_hooks = tensors(model), hooks(model)
    before_attributes = set(vars(model))
    had_generate = "generate" in model.__dict__

    wrap_stage(model, stage)
    pruned = case.run(model, batch)
    pruned_generation = generate(model, batch, do_sample=False) if case.vlm else None
    vtoken.unwrap(model)
    # a decode-site stage acts only while generating: its generated tokens show it
    changed = any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(pruned, expected)) or (
        case.vlm and not torch.equal(pruned_generation, expected_generation))
    assert changed, f"{stage.prune} changed no output: this test could not see what unwrap left behind"

    assert not hasattr(model, "vtoken"), "unwrap left model.vtoken behind"
    assert ("generate" in model.__dict__) == had_generate, "unwrap left an instance-level generate behind"
    assert set(vars(model)) == before_attributes, (
        f"unwrap changed the model's attributes: added {sorted(set(vars(model)) - before_attributes)}, "
        f"removed {sorted(before_attributes - set(vars(model)))}")
    after_hooks = hooks(model)
    left = {key: after_hooks[key] - before_hooks.get(key, set()) for key in after_hooks}
    left = {key: value for key, value in left.items() if value}
    assert not left, f"unwrap left hooks behind: {sorted(left)}"
    removed = {key for key in before_hooks if before_hooks[key] - after_hooks.get(key, set())}
    assert not removed, f"unwrap removed hooks the model had before: {sorted(removed)}"
    after_tensors = tensors(model)
    assert set(after_tensors) == set(before_tensors), (
        f"parameters/buffers changed names: added {sorted(set(after_tensors) - set(before_tensors))}, "
        f"removed {sorted(set(before_tensors) - set(after_tensors))}")
    changed = [name for name, value in before_tensors.items() if not torch.equal(after_tensors[name], value)]
    assert not changed, f"unwrap did not restore these tensors bit-exactly: {changed}"
    assert_outputs_equal(case.run(model, batch), expected, f"{case.name} {stage.id}: outputs after unwrap")
    if case.vlm:
        again = generate(model, batch, do_sample=False)
        assert torch.equal(again, expected_generation), "generate after unwrap differs from before wrap"


# --- 3. generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(GENERATION_MODES))
@pytest.mark.parametrize("case,stage", VLM)
def test_cached_generate_equals_recomputation(case, stage, mode):
    """generate(use_cache=True) equals generate(use_cache=False) under the same pruning; the returned
    sequences start with the caller's prompt (once per returned sequence)."""
    model = case.model()
    batch = case.batch("left")
    options = GENERATION_MODES[mode]
    copies = options.get("num_return_sequences", 1)
    caches: list[int] = []  # the cache length each forward call of the model receives
    spy = model.register_forward_pre_hook(lambda module, args, kwargs: caches.append(cache_length(kwargs)),
                                          with_kwargs=True)  # registered first: sees what generate passes
    wrap_stage(model, stage)
    results, calls = {}, {}
    for use_cache in (True, False):
        caches.clear()
        torch.manual_seed(0)
        results[use_cache] = generate(model, batch, use_cache=use_cache, **options)
        calls[use_cache] = list(caches)
    vtoken.unwrap(model)
    spy.remove()

    assert calls[False] and not any(calls[False]), (
        f"{mode}: generate(use_cache=False) still decoded from a KV cache (cache length per forward call: "
        f"{calls[False]}), so nothing was recomputed")

    prompt = batch["input_ids"].repeat_interleave(copies, dim=0)
    for use_cache, output in results.items():
        got = sequences(output)
        assert got.shape == (prompt.shape[0], prompt.shape[1] + NEW_TOKENS), (
            f"{mode}, use_cache={use_cache}: sequences of shape {tuple(got.shape)}, expected "
            f"{(prompt.shape[0], prompt.shape[1] + NEW_TOKENS)}")
        assert torch.equal(got[:, : prompt.shape[1]], prompt), (
            f"{mode}, use_cache={use_cache}: the sequences do not start with the caller's input_ids")
    cached, recomputed = sequences(results[True]), sequences(results[False])
    assert torch.equal(cached, recomputed), (
        f"{mode}: cached generation gave new tokens {cached[:, -NEW_TOKENS:].tolist()}, recomputation without "
        f"cache {recomputed[:, -NEW_TOKENS:].tolist()}")
    if options.get("output_scores"):
        for use_cache, output in results.items():
            assert len(output.scores) == NEW_TOKENS, f"use_cache={use_cache}: {len(output.scores)} score steps"
        for step, (a, b) in enumerate(zip(results[True].scores, results[False].scores)):
            diff = (a - b).abs().max().item()
            assert diff <= 1e-4, f"scores of step {step} differ between cached and recomputed generation by {diff:.3g}"


# --- 4. a padded batch -------------------------------------------------------------------------------
@pytest.mark.parametrize("case,stage,side", SIDED)
def test_padded_batch_equals_members_alone(case, stage, side):
    model = case.model()
    batch = case.batch("left" if side == "none" else side)
    wrap_stage(model, stage)
    together = case.run(model, batch)
    kept_together = kept_record(model)
    alone, kept_alone = [], {}
    for single in case.singles():
        alone.append(case.run(model, single))
        for site, rows in kept_record(model).items():
            kept_alone.setdefault(site, []).extend(rows)
    vtoken.unwrap(model)

    for row, single in enumerate(alone):
        what = f"{case.name} {stage.id}, {side} padding, row {row}"
        if case.vlm:
            logits = single[0]
            got = row_last(together[0], row, side, logits.shape[1])
            diff = (got - logits[0, -1]).abs().max().item()
            if diff > 1e-4:
                slot = -1 if side == "left" else logits.shape[1] - 1
                nearest = (together[0][row] - logits[0, -1]).abs().amax(-1)
                raise AssertionError(
                    f"{what}: the logits at the row's last position (slot {slot} of {together[0].shape[1]}: the row "
                    f"alone has {logits.shape[1]} positions, kept on the {side} padding side) differ from the row "
                    f"run alone by {diff:.3g}; the closest slot is {int(nearest.argmin())} "
                    f"(differs by {nearest.min().item():.3g})")
        else:
            assert_outputs_close(tuple(t[row : row + 1] for t in together), single, 1e-4, what)
    assert_kept_equal(kept_together, kept_alone, f"{case.name} {stage.id}, {side} padding: batch vs rows alone")


# --- 5. threads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,stage", ALL)
def test_threads_give_each_calls_single_result(case, stage):
    model = case.model()
    inputs = (case.singles() + [case.batch("left")])[:4]
    while len(inputs) < 4:
        inputs.append(inputs[len(inputs) % 2])
    wrap_stage(model, stage)

    def call(item):
        out = case.run(model, item)
        gen = generate(model, item, do_sample=False) if case.vlm else None
        return out, gen

    expected = [call(item) for item in inputs]
    rounds = 3
    results: dict[int, list] = {i: [] for i in range(len(inputs))}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def worker(i):
        try:
            torch.set_num_threads(1)
            barrier.wait()
            for _ in range(rounds):
                results[i].append(call(inputs[i]))
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    vtoken.unwrap(model)
    if errors:
        raise AssertionError(f"a thread failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    for i, runs in results.items():
        for n, (out, gen) in enumerate(runs):
            assert_outputs_close(out, expected[i][0], 1e-5, f"thread {i}, call {n}: forward")
            if case.vlm:
                assert torch.equal(gen, expected[i][1]), (
                    f"thread {i}, call {n}: generate gave {gen[:, -NEW_TOKENS:].tolist()}, alone "
                    f"{expected[i][1][:, -NEW_TOKENS:].tolist()}")


# --- 6. deepcopy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,stage", ALL)
def test_deepcopy_is_an_independent_wrapped_model(case, stage):
    pristine = case.model()
    batch = case.batch("left")
    unwrapped = case.run(pristine, batch)
    original = copy.deepcopy(pristine)
    wrap_stage(original, stage)
    pruned = case.run(original, batch)
    answer = generate(original, batch, do_sample=False) if case.vlm else None

    clone = copy.deepcopy(original)
    assert hasattr(clone, "vtoken"), "the deep copy is not wrapped"
    assert clone.vtoken is not original.vtoken, "the deep copy shares the original's vtoken state"
    assert_outputs_equal(case.run(clone, batch), pruned, "the deep copy's outputs")

    weight = case.weight(original)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
    changed = case.run(original, batch)
    assert any(not torch.equal(a, b) for a, b in zip(changed, pruned)), (
        "zeroing the weight did not change the original's outputs: this test could not see shared weights")
    assert_outputs_equal(case.run(clone, batch), pruned,
                         "the deep copy's outputs after the original's weights were zeroed in place")
    if case.vlm:
        assert torch.equal(generate(clone, batch, do_sample=False), answer), (
            "the deep copy's generation changed when the original's weights were zeroed in place")
    with torch.no_grad():
        weight.copy_(saved)

    vtoken.unwrap(clone)
    assert hasattr(original, "vtoken"), "unwrapping the deep copy unwrapped the original"
    assert_outputs_equal(case.run(original, batch), pruned, "the original after its deep copy was unwrapped")
    assert_outputs_equal(case.run(clone, batch), unwrapped, "the unwrapped deep copy")

    other = copy.deepcopy(original)
    vtoken.unwrap(original)
    assert hasattr(other, "vtoken"), "unwrapping the original unwrapped its deep copy"
    assert_outputs_equal(case.run(other, batch), pruned, "a deep copy after the original was unwrapped")
    assert_outputs_equal(case.run(original, batch), unwrapped, "the unwrapped original")
    if case.vlm:
        assert torch.equal(generate(other, batch, do_sample=False), answer), (
            "a deep copy's generation after the original was unwrapped")


# --- 7. pickle ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,stage", ALL)
def test_pickle_works_or_says_to_unwrap_first(case, stage):
    model = case.model()
    batch = case.batch("left")
    pickle.dumps(model)  # the unwrapped model pickles
    wrap_stage(model, stage)
    # pickled before any call: after one, transformers' own lazily installed output-capturing hooks (local
    # functions) make even an unwrapped LLaVA unpicklable
    try:
        data = pickle.dumps(model)
    except Exception as error:  # noqa: BLE001 - any refusal must say what to do
        assert "unwrap" in str(error), (
            f"pickling a wrapped model failed with {type(error).__name__}: {error} "
            "(the message must say to unwrap first)")
        return
    pruned = case.run(model, batch)
    answer = generate(model, batch, do_sample=False) if case.vlm else None
    loaded = pickle.loads(data)
    assert hasattr(loaded, "vtoken"), "the unpickled model is no longer wrapped"
    assert_outputs_equal(case.run(loaded, batch), pruned, "the unpickled model's outputs")
    if case.vlm:
        assert torch.equal(generate(loaded, batch, do_sample=False), answer), (
            "the unpickled model generates differently")
    vtoken.unwrap(loaded)


# --- 8. labels ---------------------------------------------------------------------------------------
def placeholder_labels(model, batch: dict) -> torch.Tensor:
    """input_ids as labels, with image placeholders and padding at -100."""
    labels = batch["input_ids"].clone()
    labels[batch["input_ids"] == model.config.image_token_id] = -100
    labels[batch["attention_mask"] == 0] = -100
    return labels


def labels_after_pruning(labels: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, width: int,
                         lengths: list[int]) -> torch.Tensor:
    """Labels aligned with a left-padded pruned output of ``width`` positions: each row keeps its text
    tokens (with their labels) and ``lengths[r]`` positions in all; its image run (``image`` marks the
    placeholders; one image per row) shrinks to what is left, labelled -100."""
    out = torch.full((labels.shape[0], width), -100, dtype=labels.dtype)
    for row, length in enumerate(lengths):
        real = mask[row].bool()
        values, is_image = labels[row][real].tolist(), image[row][real].tolist()
        first = is_image.index(True)
        text = [value for value, placeholder in zip(values, is_image) if not placeholder]
        shrunk = values[:first] + [-100] * (length - len(text)) + text[first:]
        out[row, width - len(shrunk):] = torch.tensor(shrunk)
    return out


def pruned_loss_reference(model, inputs: dict, labels: torch.Tensor, logits: torch.Tensor,
                          lengths: list[int]) -> torch.Tensor:
    """Cross-entropy of ``logits`` (next-token shift) against ``labels`` as they align after pruning."""
    if logits.shape[1] == labels.shape[1]:
        aligned = labels
    else:
        image = inputs["input_ids"] == model.config.image_token_id
        aligned = labels_after_pruning(labels, image, inputs["attention_mask"], logits.shape[1], lengths)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), aligned[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("case,stage", VLM)
def test_labels_give_the_loss_of_the_returned_logits(case, stage):
    """labels = input_ids with image placeholders and padding at -100: the text tokens survive pruning, so
    the loss must be the cross-entropy of the returned logits against the text labels at the positions
    they hold after pruning (each row alone, then the left-padded batch)."""
    model = case.model()
    batch = case.batch("left")
    labels = placeholder_labels(model, batch)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
    wrap_stage(model, stage, keep_all=True)
    with torch.no_grad():
        kept_all = model(**batch, labels=labels).loss
    vtoken.unwrap(model)
    assert kept_all is not None and torch.isfinite(kept_all), f"keep-all loss is {kept_all}"
    diff = (kept_all - expected).abs().item()
    assert diff <= 1e-5, f"keep-all loss {kept_all.item():.6f} differs from the unwrapped loss {expected.item():.6f}"

    wrap_stage(model, stage)
    alone, lengths = [], []
    with torch.no_grad():
        for single in case.singles():
            single_labels = placeholder_labels(model, single)
            out = model(**single, labels=single_labels)
            lengths.append(out.logits.shape[1])
            reference = pruned_loss_reference(model, single, single_labels, out.logits, [out.logits.shape[1]])
            alone.append((out.loss, reference))
        out = model(**batch, labels=labels)
    vtoken.unwrap(model)
    for row, (loss, reference) in enumerate(alone):
        assert loss is not None and torch.isfinite(loss), f"row {row} alone: the loss under pruning is {loss}"
        diff = (loss - reference).abs().item()
        assert diff <= 1e-5, (
            f"row {row} alone: the loss under pruning is {loss.item():.6f}, the cross-entropy of the returned "
            f"logits against the labels of the surviving positions is {reference.item():.6f}")
    assert out.loss is not None and torch.isfinite(out.loss), f"the loss under pruning is {out.loss}"
    reference = pruned_loss_reference(model, batch, labels, out.logits, lengths)
    diff = (out.loss - reference).abs().item()
    assert diff <= 1e-5, (
        f"padded batch: the loss under pruning is {out.loss.item():.6f}, the cross-entropy of the returned logits "
        f"{tuple(out.logits.shape)} against the labels of the surviving positions, each row's together at the "
        f"end of its row (left padding), is {reference.item():.6f}")


def run_clauses_without_labels(case, stage) -> None:
    """Every clause but the labels one, for cases whose rows hold several images or a video (the labels
    clause's reference lays out one image a row; their own files check labels their own way): keep-all
    (eager and sdpa), unwrap, cached generation in every mode, padded batches, threads, deepcopy, pickle."""
    for attn in ATTENTION:
        test_keep_all_matches_unwrapped_logits(case, stage, attn)
    test_unwrap_restores_parameters_hooks_and_outputs(case, stage)
    for mode in GENERATION_MODES:
        test_cached_generate_equals_recomputation(case, stage, mode)
    for side in case.sides:
        test_padded_batch_equals_members_alone(case, stage, side)
    test_threads_give_each_calls_single_result(case, stage)
    test_deepcopy_is_an_independent_wrapped_model(case, stage)
    test_pickle_works_or_says_to_unwrap_first(case, stage)
