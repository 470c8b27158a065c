"""Helpers for the demo tests: the `vtoken demo` console script as a server, synthetic images, and the
headless-browser run (also used to take docs/demo.png)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """Debian's chromium (scripts/install_browser.sh); Playwright's own browser download is not used."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def vtoken_script() -> str | None:
    """The installed `vtoken` console script: beside this Python first (the virtualenv's), else on PATH."""
    beside = Path(sys.executable).parent / "vtoken"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("vtoken")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`vtoken demo ARGS --port P` in a subprocess, its output in ``log``; ``stop()`` ends it."""

    def __init__(self, args: list[str], log: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.process = subprocess.Popen([vtoken_script(), "demo", *args, "--port", str(self.port)],
                                            stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 180.0) -> None:
        """Until the page answers; raises with the server's output if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vtoken demo exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vtoken demo did not serve {self.url} within {timeout:.0f} s:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


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


def bad_images(folder: Path) -> dict[str, Path]:
    """Uploads that are not images: an empty file, text named .png, and a PNG cut short."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"this is not a picture\n" * 20)
    whole = folder / "whole.png"
    scene(1).save(whole)
    truncated = folder / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:400])
    return {"empty": empty, "corrupt": corrupt, "truncated": truncated}


def run_in_browser(url: str, image_path: Path, screenshot: Path, question: str, keep: str,
                   failing_keep: str | None = None, timeout_ms: int = 90_000) -> dict:
    """Open the page in headless Chromium, upload an image, ask a question, click Compare, screenshot.

    With ``failing_keep``, a comparison with that (invalid) budget runs first; the error message the
    page shows is returned as ``error`` (and closed before the real run). Returns what the page shows:
    both answers, the overlay's size, the legend, the pruned side's info.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
            page.locator("#vtoken-image input[type=file]").set_input_files(str(image_path), timeout=timeout_ms)
            page.locator("#vtoken-image img").first.wait_for(state="visible", timeout=timeout_ms)
            page.locator("#vtoken-question textarea").fill(question)
            budget = page.locator("#vtoken-keep input, #vtoken-keep textarea").first
            error = None
            if failing_keep is not None:
                budget.fill(failing_keep)
                page.locator("#vtoken-run").click()
                toast = page.locator(".toast-body").first
                toast.wait_for(state="visible", timeout=timeout_ms)
                error = toast.inner_text()
                page.locator(".toast-body .toast-close").first.click()
                toast.wait_for(state="detached", timeout=timeout_ms)
            budget.fill(keep)
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
                "toasts": page.locator(".toast-body").count(),
                "error": error,
            }
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            return shown
        finally:
            browser.close()
