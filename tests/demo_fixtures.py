"""Helpers for the demo tests: a tiny LLaVA saved to disk with an offline-built processor, synthetic
scene images, a local app server and the headless-browser run (also used to take docs/demo.png)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from PIL import Image, ImageDraw
from tiny_models import GRID, tiny_llava

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]  # ids match tiny_models (pad 0, bos 1, <image> 3)
WORDS = ("USER ASSISTANT : ? . , what which where is are the a an of to in on left right behind front "
         "color colour shape red green blue yellow purple orange grey white black big small large cube "
         "sphere ball cylinder cone triangle square circle object objects thing things how many there "
         "yes no one two three four five six image scene picture floor wall sky light dark shiny matte "
         "metal rubber wood glass stone next near far above below between top bottom middle center corner "
         "edge side same different than more less both each other and or but it its this that has with "
         "see looks like made").split()
VOCAB_SIZE = 128  # tiny_llava's: every id the model can generate decodes to a word
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """Debian's chromium (scripts/install_browser.sh); Playwright's own browser download is not used."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def word_tokenizer():
    """A word-level tokenizer (whitespace and punctuation split) with ``<image>`` as a special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(WORDS))
    words += [f"word{i}" for i in range(VOCAB_SIZE - len(SPECIALS) - len(words))]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    tokenizer.padding_side = "left"
    return tokenizer


def llava_processor():
    """LlavaProcessor for tiny_llava: 168px crops, patch 14 -> 12 x 12 = image_seq_length tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = GRID * 14
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=image_processor, tokenizer=word_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def save_tiny_llava(path: Path) -> Path:
    """A random-init tiny LLaVA and its processor, written with save_pretrained (loadable offline)."""
    model = tiny_llava()
    assert model.config.image_seq_length == GRID * GRID
    model.save_pretrained(path)
    llava_processor().save_pretrained(path)
    return path


def scene(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A synthetic scene: a floor, a sky and a few coloured shapes."""
    import random

    rng = random.Random(seed)
    width, height = size
    picture = Image.new("RGB", size, (196, 214, 232))
    draw = ImageDraw.Draw(picture)
    draw.rectangle([0, height * 0.55, width, height], fill=(150, 140, 124))
    colours = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (181, 137, 0), (108, 113, 196)]
    for i in range(4):
        x, y = rng.randint(10, width - 80), rng.randint(int(height * 0.35), height - 70)
        s = rng.randint(36, 64)
        colour = colours[(seed + i) % len(colours)]
        shape = (seed + i) % 3
        if shape == 0:
            draw.ellipse([x, y, x + s, y + s], fill=colour, outline=(30, 30, 30))
        elif shape == 1:
            draw.rectangle([x, y, x + s, y + s], fill=colour, outline=(30, 30, 30))
        else:
            draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=colour, outline=(30, 30, 30))
    return picture


def write_samples(folder: Path, count: int = 2) -> Path:
    """Sample scenes with their questions, laid out as the package's assets/samples may be."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = {}
    for i in range(count):
        scene(i).save(folder / f"scene_{i}.png")
        questions[f"scene_{i}.png"] = ["what color is the object on the left ?", "how many objects are there ?"][i % 2]
    import json

    (folder / "questions.json").write_text(json.dumps(questions))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(demo, port: int | None = None) -> str:
    """Launch a demo on 127.0.0.1 in the background; returns its URL."""
    from vtoken.demo import launch

    port = port or free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def run_in_browser(url: str, image_path: Path, screenshot: Path, question: str | None = None,
                   keep: int | None = None, method: str | None = None, failing_keep: int | None = None,
                   timeout_ms: int = 60_000) -> dict:
    """Open the page in headless Chromium, upload an image, run one comparison, screenshot the page.

    With ``failing_keep``, a comparison with that (invalid) budget runs first and its error message is
    returned as ``error``. Returns what the page shows: both answers, the overlay's size, the legend.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
            page.locator("#vtoken-image input[type=file]").set_input_files(str(image_path), timeout=timeout_ms)
            page.locator("#vtoken-image img").first.wait_for(state="visible", timeout=timeout_ms)
            if question is not None:
                page.locator("#vtoken-question textarea").fill(question)
            if method is not None:
                box = page.locator("#vtoken-method input")
                box.fill(method)
                box.press("Enter")
            error = None
            if failing_keep is not None:
                page.locator("#vtoken-keep input").fill(str(failing_keep))
                page.locator("#vtoken-run").click()
                page.locator("#vtoken-status .vtoken-error").wait_for(state="visible", timeout=timeout_ms)
                error = page.locator("#vtoken-status").inner_text()
            if keep is not None:
                page.locator("#vtoken-keep input").fill(str(keep))
            page.locator("#vtoken-run").click()
            overlay = page.locator("#vtoken-overlay img").first
            overlay.wait_for(state="visible", timeout=timeout_ms)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#vtoken-baseline-answer textarea, "
                "#vtoken-pruned-answer textarea')].every(t => t.value.trim().length > 0)",
                timeout=timeout_ms,
            )
            page.wait_for_function(
                "() => { const i = document.querySelector('#vtoken-overlay img'); "
                "return i && i.complete && i.naturalWidth > 0; }", timeout=timeout_ms)
            time.sleep(0.3)  # let the layout settle before the screenshot
            shown = {
                "baseline": page.locator("#vtoken-baseline-answer textarea").input_value(),
                "pruned": page.locator("#vtoken-pruned-answer textarea").input_value(),
                "overlay_width": page.evaluate("document.querySelector('#vtoken-overlay img').naturalWidth"),
                "legend": page.locator("#vtoken-legend").inner_text(),
                "pruned_info": page.locator("#vtoken-pruned-info").inner_text(),
                "status": page.locator("#vtoken-status").inner_text(),
                "error": error,
            }
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            return shown
        finally:
            browser.close()
