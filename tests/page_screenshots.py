"""`python -m tests.page_screenshots` (`make screenshots`): the README's pictures of the page, taken in Chromium.

Starts `python -m app` with the shipped checkpoints (shakespeare, plain-32, residual-32) on a free port, drives the
page as a user would and writes PNGs to docs/page/ (or --out). Needs the dev extra (Playwright) and a Chromium
(`apt-get install chromium`, or TEST_CHROMIUM=/path).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from app.settings import CHECKPOINTS_DIR, DEFAULT_CHECKPOINT
from tests.app.test_page import CHROMIUM, MISSING, hover_cell, sync_api
from tests.live_server import REPO_ROOT, launch, stop

log = logging.getLogger("page_screenshots")
PROMPT = "ROMEO:\n"


def wait_done(page: object, selector: str) -> None:
    page.wait_for_selector(selector, state="attached", timeout=120_000)


def generate(page: object, button: str = "#generate") -> None:
    page.click(button)
    wait_done(page, "#output[data-done='1'], #output[data-done='error']")
    if page.get_attribute("#output", "data-done") != "1":
        raise SystemExit(f"generation failed: {page.text_content('#error')}")


def take(base: str, out: Path) -> list[Path]:
    written: list[Path] = []

    def shot(locator: object, name: str) -> None:
        path = out / name
        locator.screenshot(path=str(path))
        written.append(path)
        log.info("wrote %s", path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 800}, base_url=base)
        page.set_default_timeout(120_000)
        page.goto("/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#prompt", PROMPT)
        page.fill("#max-new-tokens", "80")
        page.fill("#temperature", "0.8")
        page.fill("#seed", "1")
        page.select_option("#lens-top", "3")
        generate(page)
        hover_cell(page, 20, 3)  # token 20, layer 3: the tooltip
        shot(page.locator("main > .row"), "page-generate.png")

        page.mouse.move(0, 0)
        page.uncheck("#layer-controls [data-layer='0'] [data-part='block']")
        generate(page, "#again")
        shot(page.locator("#intervene"), "page-intervene.png")
        page.click("#reset-intervention")
        generate(page)  # the unchanged text again, so that Inspect sees prompt + the traced generation

        page.click("#inspect-run")
        wait_done(page, "#inspect[data-state='done'], #inspect[data-state='error']")
        shot(page.locator("#inspect"), "page-inspect.png")

        page.click("#compare-run")
        wait_done(page, "#compare[data-state='done'], #compare[data-state='error']")
        shot(page.locator("#compare"), "page-compare.png")

        phone = browser.new_page(viewport={"width": 390, "height": 844}, base_url=base, device_scale_factor=2)
        phone.goto("/")
        phone.wait_for_selector("body[data-ready='1']")
        phone.fill("#max-new-tokens", "40")
        phone.fill("#seed", "1")
        generate(phone)
        phone.locator("#watch").scroll_into_view_if_needed()
        phone.screenshot(path=str(out / "page-phone.png"))
        written.append(out / "page-phone.png")
        browser.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "page")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if MISSING:
        raise SystemExit(MISSING)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs:
        server = launch(
            DEFAULT_CHECKPOINT, Path(logs), model_name="shakespeare", extra_checkpoints_dir=CHECKPOINTS_DIR, warmup=True
        )
        try:
            take(server.url, args.out)
        finally:
            stop(server)


if __name__ == "__main__":
    main()
