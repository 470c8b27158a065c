"""The Gradio demo on what users get by default: the embedded scenes model, its sample scenes, and the
`vtoken demo` console script. The comparison handler runs as a function; the served app is driven
through gradio_client and in headless Chromium. A tiny Qwen2-VL covers the other prompt family. Offline.

docs/demo.png is the browser test's screenshot: VTOKEN_DEMO_SCREENSHOT=docs/demo.png writes it there.
"""

from __future__ import annotations

import copy
import html
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")

from demo_fixtures import Server, bad_images, chromium_path, run_in_browser, scene, vtoken_script
from vtoken.demo import (
    Comparer,
    build_demo,
    comparison,
    load_model,
    load_samples,
    loading,
    prompts,
    render_overlay,
    trace_tokens,
)
from vtoken.eval import scenes, scenes_model
from vtoken.registry import STAGES
from vtoken.sites import Site

TOKENS = 576  # the embedded model: a 24 x 24 patch grid
KEEP = 64


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model()  # the embedded scenes model, as `vtoken demo` loads it


@pytest.fixture(scope="module")
def comparer(loaded):
    return Comparer(*loaded)


def sample_items() -> list[dict]:
    """The sample scenes' first questions, with the seed `vtoken eval` renders each scene from."""
    records = json.loads((loading.samples_path() / "questions.json").read_text())
    first = {}
    for record in records:
        first.setdefault(record["image"], record)
    return [first[name] for name in sorted(first)]


# --- prompts ---------------------------------------------------------------------------------------
def test_embedded_model_gets_the_prompt_vtoken_eval_uses(comparer):
    for _, question in load_samples():
        assert comparer.prompt(question) == scenes_model.prompt(question)
    assert comparer.prompt_format.source == "the processor's chat template (string content)"


QWEN_TEMPLATE = (  # a Qwen2-VL-style chat template: list content, the image as vision tokens
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_prompt_formats_by_family(loaded):
    from tiny_processors import tiny_qwen_processor

    model, processor = loaded
    plain = copy.deepcopy(processor)
    plain.chat_template = None
    fmt = prompts.prompt_format(plain, model)
    assert fmt.source == "LLaVA-1.5's plain format" and fmt("what?") == scenes_model.prompt("what?")

    qwen_model = SimpleNamespace(config=SimpleNamespace(model_type="qwen2_vl", image_token_id=5))
    qwen = tiny_qwen_processor()
    fmt = prompts.prompt_format(qwen, qwen_model)
    assert fmt.source == "Qwen2-VL's plain format"
    assert fmt("what?") == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what?<|im_end|>\n"
                            "<|im_start|>assistant\n")
    qwen.chat_template = QWEN_TEMPLATE
    fmt = prompts.prompt_format(qwen, qwen_model)
    assert fmt.source == "the processor's chat template (list content)"
    assert fmt("what?") == fmt("what?") and "<|vision_start|><|image_pad|><|vision_end|>what?" in fmt("what?")


def test_a_prompt_that_cannot_be_built_fails_at_start_up(loaded, monkeypatch, capsys):
    from vtoken.cli import main

    model, processor = loaded
    blind = copy.deepcopy(processor)
    blind.chat_template = "{% for m in messages %}USER: tell me ASSISTANT:{% endfor %}"  # drops the content
    mystery = SimpleNamespace(config=SimpleNamespace(model_type="mystery_vlm", image_token_id=4))
    with pytest.raises(prompts.PromptError) as caught:
        prompts.prompt_format(blind, mystery)
    message = str(caught.value)
    assert "list content" in message and "string content" in message and "'mystery_vlm'" in message
    assert "--prompt-template" in message
    with pytest.raises(prompts.PromptError, match=r"\{image\}"):
        Comparer(model, processor, prompt_template="Q: {question} A:")
    with pytest.raises(prompts.PromptError, match="2 times"):
        build_demo(model, processor, prompt_template="{image} {image} {question}")
    assert Comparer(model, processor, prompt_template="USER: {image}\n{question} ASSISTANT:").prompt("hi") == \
        scenes_model.prompt("hi")

    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: loaded)
    assert main(["demo", "--prompt-template", "Q: {question} A:"]) == 1
    assert "{image}" in capsys.readouterr().err


# --- the comparison as a function ------------------------------------------------------------------
@pytest.mark.parametrize("method", comparison.demo_methods())
def test_compare_runs_every_method(comparer, method):
    result = comparer.compare(scene(0), "what color is the square?", method, KEEP)
    assert result["visual_tokens"] == {"in": TOKENS, "kept": KEEP}  # pixel_shuffle: 64 picks ratio 3
    assert result["baseline"]["answer"] and result["pruned"]["answer"]
    assert result["baseline"]["latency_ms"] > 0 and result["pruned"]["latency_ms"] > 0
    assert result["prompt"] == scenes_model.prompt("what color is the square?")
    owner = np.array(result["patch_tokens"])
    assert owner.shape == (TOKENS,) and owner.max() + 1 == KEEP
    stage = STAGES.get(method)  # None for a named pipeline (vscan: a merging scan, then fastv)
    if stage is not None and not stage.merging:  # a selection: exactly the kept patches own a token
        assert (owner >= 0).sum() == KEEP and "merged into" not in result["legend"]
    else:  # merged tokens stand for several patches (pool, pixel_shuffle: all of them)
        assert KEEP <= (owner >= 0).sum() <= TOKENS
        if method in ("pool", "pixel_shuffle", "visionzip"):
            assert (owner >= 0).sum() == TOKENS and "merged into" in result["legend"]
    assert result["overlay"].size[0] == result["overlay"].size[1] > 0
    assert not hasattr(comparer.model, "vtoken")


def test_budgets_as_the_api_takes_them(comparer):
    parse = comparison.parse_budget
    assert [parse(v) for v in ("64", " 64 ", "0.25", "1", "1.0", 64, 0.5)] == [64, 64, 0.25, 1, 1.0, 64, 0.5]
    assert isinstance(parse("1"), int) and isinstance(parse("1.0"), float)
    fraction = comparer.compare(scene(1), "how many objects are there?", "cls_attn+kcenter", "0.25")
    assert fraction["visual_tokens"]["kept"] == TOKENS // 4
    assert sum(np.array(fraction["patch_tokens"]) >= 0) == TOKENS // 4
    at_llm = comparer.compare(scene(1), "how many objects are there?", "dart", "20", site="llm(2)")
    assert at_llm["site"] == "llm(2)" and at_llm["visual_tokens"]["kept"] == 20


def test_bad_requests_get_readable_messages_and_leave_the_model_clean(comparer, tmp_path):
    files = bad_images(tmp_path)
    q = "what color is the square?"
    cases = [
        ((None, q, "dart", 64), "upload an image"),
        ((files["empty"], q, "dart", 64), "'empty.png' is empty"),
        ((files["corrupt"], q, "dart", 64), "cannot read the image 'corrupt.png': not an image file"),
        ((files["truncated"], q, "dart", 64), "cannot read the image 'truncated.png'"),
        (({"path": str(files["corrupt"]), "orig_name": "holiday.png"}, q, "dart", 64), "'holiday.png'"),
        ((scene(0), "   ", "dart", 64), "ask a question"),
        ((scene(0), "what is <image> here?", "dart", 64), "image token '<image>'"),
        ((scene(0), q, "dart", ""), "set the budget"),
        ((scene(0), q, "dart", "lots"), "'lots' is not a number"),
        ((scene(0), q, "dart", "0"), "must be >= 1"),
        ((scene(0), q, "dart", "-3"), "must be >= 1"),
        ((scene(0), q, "dart", "1.5"), r"fraction of the tokens and must be in \(0, 1\]"),
        ((scene(0), q, "dart", str(TOKENS + 1)), rf"\[1, {TOKENS}\]"),
        ((scene(0), q, "no_such_method", 64), "unknown method"),
        ((scene(0), q, "", 64), "choose a method"),
    ]
    for args, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            comparer.compare(*args)
        assert not hasattr(comparer.model, "vtoken")
    for site, message in [("llm(x)", "cannot parse site"), ("everywhere", "cannot parse site")]:
        with pytest.raises(ValueError, match=message):
            comparer.compare(scene(0), q, "dart", 64, site=site)
    assert comparer.compare(scene(0), q, "dart", 12)["visual_tokens"]["kept"] == 12


def test_concurrent_comparisons_keep_their_own_settings(comparer):
    requests = [("dart", 12), ("pool", 36), ("kcenter", 50), ("fastv", 20)]
    results: dict[int, list] = {i: [] for i in range(len(requests))}
    errors = []
    start = threading.Barrier(len(requests))

    def worker(i, method, keep):
        try:
            start.wait()
            for _ in range(2):
                result = comparer.compare(scene(i), "how many objects are there?", method, keep)
                results[i].append((result["method"], result["visual_tokens"]["kept"]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i, m, k)) for i, (m, k) in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for i, (method, keep) in enumerate(requests):
        assert results[i] == [(method, keep)] * 2
    assert not hasattr(comparer.model, "vtoken")


def test_qwen2_vl_prompt_and_overlay():
    from tiny_models import tiny_qwen
    from tiny_processors import tiny_qwen_processor

    processor = tiny_qwen_processor()
    processor.chat_template = QWEN_TEMPLATE
    qwen = Comparer(tiny_qwen("2"), processor, max_new_tokens=2)
    assert qwen.prompt_format.source == "the processor's chat template (list content)"
    result = qwen.compare(scene(2).resize((64, 48)), "what is the color", "dart", 0.5)
    rows, cols = result["grid"]
    assert result["visual_tokens"] == {"in": rows * cols, "kept": rows * cols // 2}
    assert result["overlay"] is not None and isinstance(result["baseline"]["answer"], str)


def test_trace_and_overlay_show_kept_merged_and_dropped_patches():
    # 4x4 grid: keep patches 0 and 5 at the projector, then the second of them at llm(1)
    kept = {"projector": [torch.tensor([0, 5])], "llm(1)": [torch.tensor([1])]}
    owner = trace_tokens([Site("projector"), Site.parse("llm(1)")], kept, {}, 16)
    assert owner.tolist() == [-1] * 5 + [0] + [-1] * 10
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    picture = np.asarray(render_overlay(white, (4, 4), owner, merging=False, width=64), dtype=float)
    cell = picture[16:32, 16:32].mean()  # patch 5 (row 1, column 1), kept
    dropped = picture[0:16, 0:16].mean()
    assert cell > 200 and dropped < 100
    # a merge into 2 tokens: left and right halves get different colours, nothing is dimmed
    assign = torch.tensor([0, 0, 1, 1] * 4)
    owner = trace_tokens([Site("projector")], {"projector": [torch.tensor([5, 6])]}, {"projector": [assign]}, 16)
    assert owner.tolist() == assign.tolist()
    picture = np.asarray(render_overlay(white, (4, 4), owner, merging=True, width=64), dtype=float)
    assert not np.allclose(picture[20, 4], picture[20, 52]) and picture.mean() > 150


def test_trace_counts_a_decode_choice_among_the_tokens_that_entered_the_decoder():
    # 4x4 grid: the projector keeps patches 1, 3, 8, 12 (decoder-input tokens 0..3), llm(1) keeps tokens
    # 1, 2, 3 (patches 3, 8, 12); the decode site then keeps decoder-input tokens 2 and 3 (patches 8, 12)
    sites = [Site("projector"), Site.parse("llm(1)"), Site.parse("decode")]
    kept = {"projector": [torch.tensor([1, 3, 8, 12])], "llm(1)": [torch.tensor([1, 2, 3])],
            "decode": [torch.tensor([2, 3])]}
    owner = trace_tokens(sites, kept, {}, 16)
    assert [p for p in range(16) if owner[p] >= 0] == [8, 12] and owner[8] == 0 and owner[12] == 1


def test_samples_folder_formats(tmp_path):
    assert load_samples() == [(str(loading.samples_path() / item["image"]), item["question"])
                              for item in sample_items()]
    folder = tmp_path / "samples"
    folder.mkdir()
    scene(0).save(folder / "scene_0.png")
    scene(1).save(folder / "scene_1.png")
    (folder / "questions.json").write_text(json.dumps({"scene_0.png": "what color is the object on the left?",
                                                       "scene_1": ["how many objects are there?", "more?"]}))
    assert load_samples(folder) == [(str(folder / "scene_0.png"), "what color is the object on the left?"),
                                    (str(folder / "scene_1.png"), "how many objects are there?")]
    other = tmp_path / "other"
    other.mkdir()
    scene(3).save(other / "a.jpg")
    (other / "a.txt").write_text("\nis there a cube ?\n")
    scene(4).save(other / "b.png")
    (other / "meta.jsonl").write_text(json.dumps({"image": "b.png", "questions": ["which is red ?"]}) + "\n")
    scene(5).save(other / "c.png")
    assert load_samples(other) == [(str(other / "a.jpg"), "is there a cube ?"),
                                   (str(other / "b.png"), "which is red ?"),
                                   (str(other / "c.png"), loading.DEFAULT_QUESTION)]
    assert load_samples(tmp_path / "missing") == []


def test_cli_defaults_and_missing_model(monkeypatch, tmp_path, capsys):
    from vtoken.cli import build_parser, main

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share, args.model, args.prompt_template) == \
        ("127.0.0.1", 7860, False, None, None)
    monkeypatch.setattr(loading, "embedded_model_path", lambda: tmp_path / "scenes-llava")
    with pytest.raises(FileNotFoundError, match="--model"):
        load_model()
    assert main(["demo"]) == 1
    message = capsys.readouterr().err
    assert "scenes-llava" in message and "--model" in message
    assert main(["demo", "--model", str(tmp_path)]) == 1  # a directory without a model
    assert "no config.json" in capsys.readouterr().err


# --- `vtoken demo` as users start it ---------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`vtoken demo --port P`: the console script with its defaults (the embedded model, 127.0.0.1)."""
    if vtoken_script() is None:
        pytest.skip("the vtoken console script is not installed")
    server = Server([], tmp_path_factory.mktemp("server") / "vtoken-demo.log")
    try:
        server.wait()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


def compare_api(client, image, question, keep="64", method="dart", site=""):
    from gradio_client import handle_file

    return client.predict(None if image is None else handle_file(str(image)), question, method, keep, site, 32,
                          api_name="/compare")


def test_cli_answers_the_sample_scenes_as_vtoken_eval_does(served, client):
    out = served.output()
    assert f"serving on http://127.0.0.1:{served.port}" in out
    assert "prompt from the processor's chat template (string content): 'USER: <image>\\n{question} ASSISTANT:'" in out
    model, processor = scenes_model.load()  # vtoken eval's loader and prompt, independently of the demo
    items = sample_items()
    assert len(items) == len(load_samples()) >= 4
    for item in items:
        path = loading.samples_path() / item["image"]
        rendered = scenes.make_scene(item["seed"])[0]  # the scene as the benchmark renders it
        assert np.array_equal(np.array(Image.open(path).convert("RGB")), np.array(rendered))
        question = item["question"]
        inputs = processor(images=rendered, text=scenes_model.prompt(question), return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        greedy = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        scored = scenes_model.predict(model, processor, [np.array(rendered)], [question])[0]
        assert greedy.lower() == scored  # one-word answers: generation's text is what eval scores

        base, _, pruned, pruned_info, overlay, legend, details = compare_api(client, path, question)
        assert base == greedy, (item, details)
        assert pruned and pruned != "(no text: the model generated only special tokens)"
        assert details["visual_tokens"] == {"in": TOKENS, "kept": KEEP}
        assert details["prompt"] == scenes_model.prompt(question)
        assert f"**{KEEP}** of {TOKENS}" in pruned_info and "kept bright" in legend
        assert Image.open(overlay).size[0] > 0


def test_cli_shows_readable_errors_through_the_api(served, client, tmp_path):
    from gradio_client.exceptions import AppError

    files = bad_images(tmp_path)
    scene_path, question = load_samples()[0]
    cases = [
        ((None, question), "upload an image"),
        ((files["empty"], question), "the image 'empty.png' is empty (0 bytes)"),
        ((files["corrupt"], question), "cannot read the image 'corrupt.png': not an image file"),
        ((scene_path, ""), "ask a question about the image"),
        ((scene_path, question, "a lot"), "the budget 'a lot' is not a number"),
        ((scene_path, question, "0"), "keep=0: an int budget is tokens per image and must be >= 1"),
        ((scene_path, question, "1000"), f"use an int in [1, {TOKENS}] or a fraction in (0, 1]"),
        ((scene_path, question, "64", "dart", "llm(x)"), "cannot parse site 'llm(x)'"),
    ]
    for args, message in cases:
        with pytest.raises(AppError) as caught:
            compare_api(client, *args)
        assert message in html.unescape(str(caught.value)), (args, str(caught.value))
    details = compare_api(client, scene_path, question, keep="0.25")[-1]
    assert details["visual_tokens"]["kept"] == TOKENS // 4 and "Traceback" not in served.output()


def test_page_end_to_end_in_headless_chromium(served, tmp_path):
    pytest.importorskip("playwright.sync_api")
    if chromium_path() is None:
        pytest.skip("chromium is not installed (scripts/install_browser.sh)")
    shot = Path(os.environ.get("VTOKEN_DEMO_SCREENSHOT") or tmp_path / "demo.png")
    item = sample_items()[0]
    path = loading.samples_path() / item["image"]
    shown = run_in_browser(served.url, path, shot, question=item["question"], keep=str(KEEP),
                           failing_keep="1000")
    assert "Could not run this comparison" in shown["error"] and f"[1, {TOKENS}]" in shown["error"]
    assert shown["baseline"] == item["answer"]  # the sample's question, answered right by the full model
    assert shown["pruned"] and shown["toasts"] == 0
    assert shown["overlay_width"] > 0 and f"{KEEP} of {TOKENS} visual tokens" in shown["legend"]
    assert f"{KEEP}" in shown["pruned_info"]
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
