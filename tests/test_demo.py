"""The Gradio demo: the comparison handler as a function, the app through gradio_client, and the page in
headless Chromium. Everything runs on a tiny random-init LLaVA saved to disk, offline."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")

from demo_fixtures import chromium_path, launch_local, run_in_browser, save_tiny_llava, scene, write_samples
from tiny_models import GRID, TOKENS_PER_IMAGE

from vtoken import demo as vdemo
from vtoken.demo import Comparer, build_demo, load_model, load_samples, render_overlay, trace_tokens
from vtoken.sites import Site

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, processor = load_model(tiny_dir)
    model.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens
    return model, processor


@pytest.fixture(scope="module")
def comparer(loaded):
    return Comparer(*loaded, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_samples(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module")
def app(loaded, samples):
    demo = build_demo(*loaded, samples=samples, max_new_tokens=NEW_TOKENS)
    url = launch_local(demo)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[1], verbose=False)


def expected_kept(method: str, keep: int) -> int:
    return 36 if method == "pixel_shuffle" else keep  # fixed ratio: the budget 36 picks 2x2


# --- the handler as a plain function --------------------------------------------------------------
@pytest.mark.parametrize("method", vdemo.demo_methods())
def test_compare_runs_every_method(comparer, method):
    keep = 36
    result = comparer.compare(scene(0), "what color is the cube ?", method, keep)
    kept = expected_kept(method, keep)
    assert result["visual_tokens"] == {"in": TOKENS_PER_IMAGE, "kept": kept}
    assert isinstance(result["baseline"]["answer"], str) and result["baseline"]["answer"]
    assert isinstance(result["pruned"]["answer"], str) and result["pruned"]["answer"]
    assert result["baseline"]["new_tokens"] == result["pruned"]["new_tokens"] == NEW_TOKENS
    assert result["baseline"]["latency_ms"] > 0 and result["pruned"]["latency_ms"] > 0
    owner = np.array(result["patch_tokens"])
    assert owner.shape == (GRID * GRID,) and owner.max() + 1 == kept
    merging = method in ("pool", "pixel_shuffle")
    assert (owner >= 0).sum() == (GRID * GRID if merging else kept)
    assert ("merged into" in result["legend"]) == merging
    assert result["overlay"].size[0] == result["overlay"].size[1] > 0
    assert not hasattr(comparer.model, "vtoken")


def test_compare_at_an_llm_site_and_with_a_pipeline(comparer):
    at_llm = comparer.compare(scene(1), "how many objects ?", "dart", 20, site="llm(2)")
    assert at_llm["site"] == "llm(2)" and at_llm["visual_tokens"]["kept"] == 20
    pipeline = comparer.compare(scene(1), "how many objects ?", "cls_attn+kcenter", 0.25)
    assert pipeline["visual_tokens"]["kept"] == TOKENS_PER_IMAGE // 4
    assert sum(np.array(pipeline["patch_tokens"]) >= 0) == TOKENS_PER_IMAGE // 4


def test_unpruned_answer_matches_the_plain_model(comparer, loaded):
    model, processor = loaded
    result = comparer.compare(scene(2), "what is left of the sphere ?", "random", 8)
    inputs = processor(images=scene(2), text=comparer.prompt("what is left of the sphere ?"), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    plain = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert result["baseline"]["answer"] == plain


def test_budget_above_the_token_count_is_refused_and_the_next_request_works(comparer):
    with pytest.raises(ValueError, match=rf"\[1, {TOKENS_PER_IMAGE}\]"):
        comparer.compare(scene(0), "what color ?", "dart", TOKENS_PER_IMAGE + 1)
    assert not hasattr(comparer.model, "vtoken")
    with pytest.raises(ValueError, match="unknown method"):
        comparer.compare(scene(0), "what color ?", "no_such_method", 8)
    with pytest.raises(ValueError, match="image"):
        comparer.compare(None, "what color ?", "dart", 8)
    assert comparer.compare(scene(0), "what color ?", "dart", 12)["visual_tokens"]["kept"] == 12


def test_concurrent_comparisons_keep_their_own_settings(comparer):
    requests = [("dart", 12), ("pool", 36), ("kcenter", 50), ("fastv", 20)]
    results: dict[int, list] = {i: [] for i in range(len(requests))}
    errors = []
    start = threading.Barrier(len(requests))

    def worker(i, method, keep):
        try:
            start.wait()
            for _ in range(2):
                result = comparer.compare(scene(i), "what color ?", method, keep)
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


def test_trace_and_overlay_show_kept_merged_and_dropped_patches():
    # 4x4 grid: keep patches 0 and 5 at the projector, then the second of them at llm(1)
    kept = {"projector": [torch.tensor([0, 5])], "llm(1)": [torch.tensor([1])]}
    owner = trace_tokens([Site("projector"), Site.parse("llm(1)")], kept, {}, 16)
    assert owner.tolist() == [-1] * 5 + [0] + [-1] * 10
    white = vdemo.Image.new("RGB", (64, 64), (255, 255, 255))
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


def test_samples_folder_formats(tmp_path, samples):
    assert load_samples(samples) == [
        (str(samples / "scene_0.png"), "what color is the object on the left ?"),
        (str(samples / "scene_1.png"), "how many objects are there ?"),
    ]
    other = tmp_path / "other"
    other.mkdir()
    scene(3).save(other / "a.jpg")
    (other / "a.txt").write_text("\nis there a cube ?\n")
    scene(4).save(other / "b.png")
    (other / "meta.jsonl").write_text(json.dumps({"image": "b.png", "questions": ["which is red ?"]}) + "\n")
    scene(5).save(other / "c.png")
    assert load_samples(other) == [(str(other / "a.jpg"), "is there a cube ?"),
                                   (str(other / "b.png"), "which is red ?"),
                                   (str(other / "c.png"), vdemo.DEFAULT_QUESTION)]
    assert load_samples(tmp_path / "missing") == []


def test_cli_defaults_and_missing_model(monkeypatch, tmp_path, capsys):
    from vtoken.cli import build_parser, main

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, None)
    monkeypatch.setattr(vdemo, "embedded_model_path", lambda: tmp_path / "scenes-llava")
    with pytest.raises(FileNotFoundError, match="--model"):
        load_model()
    assert main(["demo"]) == 1
    message = capsys.readouterr().err
    assert "scenes-llava" in message and "--model" in message
    assert main(["demo", "--model", str(tmp_path)]) == 1  # a directory without a model
    assert "no config.json" in capsys.readouterr().err


# --- the app through gradio_client ----------------------------------------------------------------
def test_app_binds_to_localhost_and_answers_through_the_api(app, client, samples):
    from gradio_client import handle_file

    demo, url = app
    assert url.startswith("http://127.0.0.1:") and demo.share is False
    status, base, base_info, pruned, pruned_info, overlay, legend, details = client.predict(
        handle_file(str(samples / "scene_0.png")), "what color is the cube ?", "dart", 24, "", NEW_TOKENS,
        api_name="/compare",
    )
    assert status == "" and base and pruned
    assert details["visual_tokens"] == {"in": TOKENS_PER_IMAGE, "kept": 24}
    assert "24" in pruned_info and "ms" in base_info and "kept bright" in legend
    assert vdemo.Image.open(overlay).size[0] > 0


def test_concurrent_api_requests_get_their_own_budgets(client, samples):
    from gradio_client import handle_file

    image = handle_file(str(samples / "scene_1.png"))
    jobs = {keep: client.submit(image, "how many objects ?", method, keep, "", NEW_TOKENS, api_name="/compare")
            for method, keep in [("kcenter", 16), ("pool", 36)]}
    for keep, job in jobs.items():
        details = job.result(timeout=120)[-1]
        assert details["keep"] == keep and details["visual_tokens"]["kept"] == keep


def test_api_error_is_shown_and_the_next_request_works(client, samples):
    from gradio_client import handle_file

    image = handle_file(str(samples / "scene_0.png"))
    failed = client.predict(image, "what color ?", "dart", 1000, "", NEW_TOKENS, api_name="/compare")
    assert "Could not run this comparison" in failed[0] and f"[1, {TOKENS_PER_IMAGE}]" in failed[0]
    assert "error" in failed[-1] and failed[3] == ""
    ok = client.predict(image, "what color ?", "dart", 10, "", NEW_TOKENS, api_name="/compare")
    assert ok[0] == "" and ok[-1]["visual_tokens"]["kept"] == 10


# --- the page in a browser ------------------------------------------------------------------------
def test_page_end_to_end_in_headless_chromium(app, samples, tmp_path):
    pytest.importorskip("playwright.sync_api")
    if chromium_path() is None:
        pytest.skip("chromium is not installed (scripts/install_browser.sh)")
    shot = tmp_path / "demo.png"
    shown = run_in_browser(app[1], samples / "scene_0.png", shot, question="what color is the cube ?", keep=16,
                           failing_keep=1000)
    assert "Could not run this comparison" in shown["error"] and f"[1, {TOKENS_PER_IMAGE}]" in shown["error"]
    assert shown["baseline"] and shown["pruned"] and shown["status"].strip() == ""
    assert shown["overlay_width"] > 0 and "16 of 144 visual tokens" in shown["legend"]
    assert "16" in shown["pruned_info"]
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
