"""The page at `/` in a real browser: headless Chromium (the system's, through Playwright) against a live server.

Each test checks the page against the API itself: the text streamed into the page equals what `/generate` returns
for the very request the page sent, the charts hold the numbers `/diagnostics` returns, and no request leaves for
another host. One browser per module, one fresh context per test.

Needs Chromium: `apt-get install chromium` (Debian/Ubuntu; `.ci/run` does it and sets TEST_REQUIRE_BROWSER=1, which
turns a missing browser into a failure). Without it the module is skipped and pytest's summary (-ra) says why.
Playwright's own browser download is not used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from app.settings import CHECKPOINTS_DIR
from tests.conftest import APP_CONFIG
from tests.live_server import Server

try:
    from playwright import sync_api
except ImportError:  # the dev extra installs it
    sync_api = None


def find_chromium() -> str | None:
    """$TEST_CHROMIUM, else the first Chromium-like browser on PATH."""
    given = os.environ.get("TEST_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
MISSING = (
    "Playwright is not installed: pip install -e '.[dev]'"
    if sync_api is None
    else "no Chromium for the page's browser tests: install it with `apt-get install chromium` (Debian/Ubuntu) "
    "or point TEST_CHROMIUM at a Chromium/Chrome binary"
    if CHROMIUM is None
    else None
)
if MISSING and os.environ.get("TEST_REQUIRE_BROWSER") == "1":  # CI (.ci/run) must run these, never skip them
    pytest.fail(MISSING, pytrace=False)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

N_LAYER = APP_CONFIG.n_layer
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
TIMEOUT_MS = 30_000
CHART_SERIES_JS = """id => {
  const c = echarts.getInstanceByDom(document.getElementById(id));
  if (!c) return null;
  return c.getOption().series.map(s => ({name: s.name, type: s.type, data: s.data}));
}"""


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The tiny test model as "tiny", plus the shipped plain-32 and residual-32 for Compare (residual-32 with its
    tuned lens).

    Every decode step is held 10 ms (tests/slow_app.py) so that a generation is still running when Esc is pressed.
    """
    extra = tmp_path_factory.mktemp("page_models")
    for name in ("plain-32", "residual-32"):
        (extra / f"{name}.safetensors").symlink_to(CHECKPOINTS_DIR / f"{name}.safetensors")
    lens = "residual-32.lens.safetensors"
    (extra / lens).symlink_to(CHECKPOINTS_DIR / lens)
    return start_server(extra_checkpoints_dir=extra, step_delay_s=0.01)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Visit:
    """A page in a fresh browser context that records every request and lets none leave for another origin."""

    def __init__(self, browser: object, base: str, width: int = 1280, height: int = 800) -> None:
        self.base = base
        self.origin = urlsplit(base)[:2]
        self.requests: list[str] = []
        self.foreign: list[str] = []
        self.console: list[str] = []
        self.context = browser.new_context(viewport={"width": width, "height": height}, base_url=base)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def _console(self, message: object) -> None:
        # an API answering 4xx is logged by Chromium as "Failed to load resource"; the tests check those answers
        if message.type == "error" and not message.text.startswith("Failed to load resource: the server responded"):
            self.console.append(message.text)

    def _route(self, route: object) -> None:
        url = route.request.url
        if urlsplit(url)[:2] == self.origin or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def open(self, path: str = "/") -> object:
        self.page.goto(path)
        if path == "/":
            self.page.wait_for_selector("body[data-ready='1']")
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser: object, server: Server) -> Iterator[Callable[..., Visit]]:
    """Factory: visit(width=1280, height=800) -> Visit; after the test, no request went to another host and the
    page logged no error."""
    visits: list[Visit] = []

    def make(**size: int) -> Visit:
        visits.append(Visit(browser, server.url, **size))
        return visits[-1]

    yield make
    for v in visits:
        v.close()
    for v in visits:
        assert not v.foreign, f"requests to other hosts: {v.foreign}"
        assert all(urlsplit(u)[:2] == v.origin for u in v.requests if not u.startswith(("data:", "blob:")))
        assert not v.console, v.console


def fill_write(
    page: object,
    *,
    prompt: str = "ab",
    model: str = "tiny",
    max_new: int = 12,
    seed: int | str = 7,
    temperature: float = 0.8,
    trace: bool = True,
    lens_top: int = 2,
) -> None:
    page.fill("#prompt", prompt)
    page.select_option("#model", model)
    page.fill("#max-new-tokens", str(max_new))
    page.fill("#temperature", str(temperature))
    page.fill("#seed", str(seed))
    page.set_checked("#trace", trace)
    page.select_option("#lens-top", str(lens_top))


def run_generation(page: object, button: str = "#generate") -> dict:
    """Click `button`, wait for the page to finish, return the JSON body the page POSTed to /generate."""
    with page.expect_request(lambda r: r.url.endswith("/generate") and r.method == "POST") as req:
        page.click(button)
    page.wait_for_selector("#output[data-done='1'], #output[data-done='error']", state="attached")
    assert page.get_attribute("#output", "data-done") == "1", page.text_content("#error")
    return req.value.post_data_json


def replay(server: Server, path: str, body: dict, **changes: object) -> dict:
    """POST `body` (with `changes`) to the server directly, as JSON; the decoded answer."""
    resp = httpx.post(f"{server.url}{path}", json={**body, **changes}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def hover_cell(page: object, col: int, layer: int) -> None:
    """Move the mouse to the centre of one heatmap cell (the canvas gives its geometry in data attributes)."""
    canvas = page.locator("#trace-heatmap")
    box = canvas.bounding_box()
    w, h, top = (float(canvas.get_attribute(f"data-{k}")) for k in ("cell-w", "cell-h", "top"))
    page.mouse.move(box["x"] + (col + 0.5) * w, box["y"] + top + (layer + 0.5) * h)


def chart_series(page: object, chart_id: str) -> list[dict]:
    series = page.evaluate(CHART_SERIES_JS, chart_id)
    assert series is not None, f"{chart_id} was never drawn"
    return series


def positive_or_none(values: list[float | None]) -> list[float | None]:
    """What a log axis can show: zeros (underflow) and missing values are gaps."""
    return [v if v is not None and v > 0 else None for v in values]


# ---------------------------------------------------------------------------------------------------------------


def test_page_loads_its_models_and_one_control_row_per_layer(visit: Callable[..., Visit], server: Server) -> None:
    page = visit().open()
    served = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == served and {"tiny", "plain-32", "residual-32"} <= set(options)
    assert page.locator("#layer-controls [data-layer]").count() == N_LAYER
    for part in ("block", "attn", "mlp"):
        assert page.locator(f"#layer-controls [data-layer='0'] [data-part='{part}']").is_checked()
    page.select_option("#model", "residual-32")
    assert page.locator("#layer-controls [data-layer]").count() == 32
    assert page.get_attribute("#trace-heatmap", "data-rows") == "32"
    assert page.is_hidden("#error")


def test_streamed_text_equals_generate_and_the_heatmap_grows_with_it(
    visit: Callable[..., Visit], server: Server
) -> None:
    page = visit().open()
    fill_write(page, prompt="The page ", max_new=14, seed=7)
    sent = run_generation(page)
    assert sent["stream"] is True and sent["seed"] == 7 and sent["trace"] is True and sent["logit_lens_top"] == 2
    expected = replay(server, "/generate", sent, stream=False)
    assert page.text_content("#output") == expected["text"]
    assert int(page.get_attribute("#output", "data-tokens")) == expected["usage"]["completion_tokens"] == 14
    assert page.text_content("#output-prompt") == "The page "

    canvas = page.locator("#trace-heatmap")
    assert canvas.get_attribute("data-rows") == str(N_LAYER)
    assert canvas.get_attribute("data-cols") == str(len(expected["trace"]["tokens"])) == "14"
    # hovering a cell shows that cell's figures: the same numbers the non-streamed answer carries
    col, layer = 3, N_LAYER - 1
    hover_cell(page, col, layer)
    tip = page.text_content("#heatmap-tip")
    token = expected["trace"]["tokens"][col]
    assert tip.startswith(f"layer {layer} · token {col} "), tip
    assert f"resid_norm   {token['resid_norm'][layer]:.4g}" in tip, tip  # the page shows 4 significant digits
    assert f"update_ratio {token['update_ratio'][layer]:.4g}" in tip, tip
    assert "logit lens: " in tip and len(token["logit_lens"][layer]) == 2
    page.check("input[name='metric'][value='update_ratio']")
    assert canvas.get_attribute("data-metric") == "update_ratio"


def test_switching_block_0_off_changes_the_text(visit: Callable[..., Visit], server: Server) -> None:
    page = visit().open()
    fill_write(page, prompt="Switch ", max_new=16, seed=11, trace=False)
    first = run_generation(page)
    assert "intervention" not in first
    page.uncheck("#layer-controls [data-layer='0'] [data-part='block']")
    assert "skip L0 block" in page.text_content("#intervention-summary")
    again = run_generation(page, "#again")
    assert again["intervention"] == {"skip": [{"layer": 0, "part": "block"}]}
    assert {k: v for k, v in again.items() if k != "intervention"} == first  # same request, same seed
    before, after = page.text_content("#diff-left"), page.text_content("#diff-right")
    assert before == replay(server, "/generate", first, stream=False)["text"]
    assert after == replay(server, "/generate", again, stream=False)["text"]
    assert before != after
    at = int(page.get_attribute("#diff-note", "data-first"))
    assert before[:at] == after[:at] and (at == min(len(before), len(after)) or before[at] != after[at])
    assert page.locator("#diff-right mark").count() == 1
    # with everything back on, "Generate again" gives the first text again
    page.click("#reset-intervention")
    assert run_generation(page, "#again").get("intervention") is None
    assert page.text_content("#diff-right") == before


def test_layer_controls_make_the_intervention_the_api_takes(visit: Callable[..., Visit], server: Server) -> None:
    page = visit().open()
    fill_write(page, prompt="Scale ", max_new=4, seed=5, trace=False)
    row0, row1 = (f"#layer-controls [data-layer='{i}']" for i in (0, 1))
    page.uncheck(f"{row1} [data-part='attn']")
    page.locator(f"{row1} [data-role='scale']").fill("0.5")
    page.select_option(f"{row1} [data-role='scale-part']", "block")
    page.locator(f"{row0} [data-role='scale']").fill("1.5")  # part: mlp (the default)
    page.uncheck(f"{row0} [data-part='mlp']")  # ... which is now skipped: the scale would repeat (0, mlp)
    sent = run_generation(page)
    assert sent["intervention"] == {
        "skip": [{"layer": 0, "part": "mlp"}, {"layer": 1, "part": "attn"}],
        "scale": [{"layer": 1, "part": "block", "factor": 0.5}],
    }
    assert page.text_content("#output") == replay(server, "/generate", sent, stream=False)["text"]
    page.check(f"{row0} [data-part='mlp']")
    page.uncheck(f"{row0} [data-part='block']")  # block off: the layer's other entries are implied
    assert "skip L0 block, L1 attn; scale L1 block ×0.5" in page.text_content("#intervention-summary")
    assert page.is_disabled(f"{row0} [data-part='attn']")


def serves_intervention_add(server: Server) -> bool:
    """Whether the server takes `intervention.add` (the per-request half of #29, built on another branch)."""
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    return "add" in schemas["InterventionSpec"]["properties"]


def make_vector_on_page(page: object, name: str, layer: int, positive: str, negative: str) -> dict:
    """Fill the Steer panel, click "Make vector", wait for it; the JSON body the page POSTed."""
    page.fill("#steer-positive", positive)
    page.fill("#steer-negative", negative)
    page.fill("#steer-name", name)
    page.select_option("#steer-layer", str(layer))
    with page.expect_request(lambda r: r.url.endswith("/steering/vectors") and r.method == "POST") as req:
        page.click("#steer-make")
    page.wait_for_selector("#steer[data-state='made'], #steer[data-state='error']")
    assert page.get_attribute("#steer", "data-state") == "made", page.text_content("#error")
    return req.value.post_data_json


def test_steer_makes_a_vector_from_two_lists_of_lines(visit: Callable[..., Visit], server: Server) -> None:
    page = visit().open()
    assert page.locator("#steer-layer option").count() == N_LAYER
    assert page.input_value("#steer-vector") == ""  # nothing picked: no steering
    sent = make_vector_on_page(page, "page-upper", 1, "TO BE\n\nOR NOT\r\n", "to be\nor not")
    assert sent == {
        "name": "page-upper",
        "model": "tiny",
        "layer": 1,
        "positive": ["TO BE", "OR NOT"],  # one line each, blank lines dropped
        "negative": ["to be", "or not"],
        "reduce": "mean",
        "replace": True,
    }
    try:
        stored = httpx.get(f"{server.url}/steering/vectors/page-upper").json()
        direct = httpx.post(f"{server.url}/steering/vectors", json={**sent, "name": "page-upper-api"}).json()
        assert stored["vector"] == httpx.get(f"{server.url}/steering/vectors/page-upper-api").json()["vector"]
        assert stored["norm"] == direct["norm"] and stored["positive"] == 2
        assert page.input_value("#steer-vector") == "page-upper"  # the new vector is picked
        assert f"norm {stored['norm']:.4}" in page.text_content("#steer-make-status")
        page.locator("#steer-coeff").fill("0")
        assert page.text_content("#intervention-summary") == "intervention: none"  # coeff 0: no steering
        # a name the API refuses is shown as the API words it
        page.fill("#steer-name", "no spaces")
        page.click("#steer-make")
        page.wait_for_selector("#steer[data-state='error']")
        assert "name" in page.text_content("#error")
    finally:
        for name in ("page-upper", "page-upper-api"):
            httpx.delete(f"{server.url}/steering/vectors/{name}")


def test_steer_generate_again_sends_the_vector_by_name(visit: Callable[..., Visit], server: Server) -> None:
    """The request the page sends is the API's `intervention.add` entry. Its text is checked against the API only
    where the server takes `intervention.add` (the per-request half of #29, on another branch until merged)."""
    page = visit().open()
    fill_write(page, prompt="Steer ", max_new=12, seed=9, trace=False)
    first = run_generation(page)
    try:
        make_vector_on_page(page, "page-steer", 1, "ABC\nDEF", "abc\ndef")
        page.select_option("#steer-layer", "0")  # used after another layer than it was made at
        page.locator("#steer-coeff").fill("2")
        page.select_option("#steer-positions", "generated")
        assert page.text_content("#steer-coeff-value") == "2.0"
        assert "add page-steer ×2 after L0 (generated)" in page.text_content("#intervention-summary")
        with page.expect_request(lambda r: r.url.endswith("/generate") and r.method == "POST") as req:
            page.click("#steer-again")
        page.wait_for_selector("#output[data-done='1'], #output[data-done='error']", state="attached")
        again = req.value.post_data_json
        assert again["intervention"] == {
            "add": [{"layer": 0, "name": "page-steer", "coeff": 2, "positions": "generated"}]
        }
        assert {k: v for k, v in again.items() if k != "intervention"} == first  # same request, same seed
        if not serves_intervention_add(server):
            assert "intervention" in page.text_content("#error")  # the API's own refusal, shown
            pytest.skip("this server does not take intervention.add yet (the per-request half of #29)")
        assert page.get_attribute("#output", "data-done") == "1", page.text_content("#error")
        before, after = page.text_content("#steer-left"), page.text_content("#steer-right")
        assert before == replay(server, "/generate", first, stream=False)["text"]
        assert after == replay(server, "/generate", again, stream=False)["text"]
        assert page.get_attribute("#steer-note", "data-first") is not None
        assert "page-steer" in page.text_content("#steer-right-label")
    finally:
        httpx.delete(f"{server.url}/steering/vectors/page-steer")


def test_inspect_draws_what_diagnostics_returns(visit: Callable[..., Visit], server: Server) -> None:
    v = visit()
    page = v.open()
    fill_write(page, prompt="Look inside ", max_new=8, seed=3, lens_top=2)
    sent = run_generation(page)
    generated = page.text_content("#output")
    with page.expect_request(lambda r: r.url.endswith("/diagnostics")) as req:
        page.click("#inspect-run")
    page.wait_for_selector("#inspect[data-state='done'], #inspect[data-state='error']")
    assert page.get_attribute("#inspect", "data-state") == "done", page.text_content("#error")
    body = req.value.post_data_json
    sent_bytes = bytes(body["tokens"])  # the bytes written, not the text (its U+FFFD are other bytes)
    assert sent_bytes.startswith(sent["prompt"].encode()) and len(sent_bytes) == len(sent["prompt"].encode()) + 8
    assert sent_bytes.decode(errors="replace") == sent["prompt"] + generated and body["gradients"] and body["ablation"]
    d = replay(server, "/diagnostics", body)
    layers = d["layers"]
    assert len(layers) == N_LAYER

    norms = {s["name"]: s["data"] for s in chart_series(page, "chart-norms")}
    for name in ("resid_pre", "resid_mid", "resid_post"):
        assert norms[name] == [e[name]["mean"] for e in layers]
    update = {s["name"]: s["data"] for s in chart_series(page, "chart-update")}
    for part in ("block", "attn", "mlp"):
        assert update[part] == positive_or_none([e["update_ratio"][part] for e in layers])
    (grad,) = chart_series(page, "chart-grad")
    assert grad["data"] == positive_or_none([e["grad_norm"] for e in layers])
    ablation = {s["name"]: s["data"] for s in chart_series(page, "chart-ablation")}
    for part in ("block", "attn", "mlp"):
        assert ablation[f"ΔLoss {part}"] == [e["delta_loss"][part] for e in layers]
    assert ablation["BI"] == [e["block_influence"] for e in layers]

    # hovering the charts raises their tooltips without a CSP violation (the fixture fails the test on any console
    # error; ECharts' HTML tooltips carry style attributes that `style-src 'self'` refuses, so the page draws them
    # on the canvas)
    for chart_id in ("chart-norms", "chart-lens"):
        page.locator(f"#{chart_id}").scroll_into_view_if_needed()
        box = page.locator(f"#{chart_id}").bounding_box()
        for dx in (0, 8):
            page.mouse.move(box["x"] + box["width"] / 2 + dx, box["y"] + box["height"] / 3)
        page.wait_for_timeout(400)
    assert not v.console, v.console[:1]

    (lens,) = chart_series(page, "chart-lens")
    cells = {(x, y): p for x, y, p in lens["data"]}
    columns = sorted({x for x, _ in cells})
    # one column per generated token (the trace's logit lens), then the last position from /diagnostics
    assert len(columns) == 8 + 1
    last = columns[-1]
    assert [cells[(last, layer)] for layer in range(N_LAYER)] == [e["logit_lens"]["top"][0]["prob"] for e in layers]


def test_compare_draws_plain_and_residual_gradients_on_one_log_chart(
    visit: Callable[..., Visit], server: Server
) -> None:
    page = visit().open()
    page.fill("#prompt", "ROMEO: But soft")
    with page.expect_request(lambda r: r.url.endswith("/diagnostics")) as req:
        page.click("#compare-run")
    page.wait_for_selector("#compare[data-state='done'], #compare[data-state='error']")
    assert page.get_attribute("#compare", "data-state") == "done", page.text_content("#error")
    body = req.value.post_data_json
    series = {s["name"]: s["data"] for s in chart_series(page, "chart-compare")}
    assert set(series) == {"plain-32", "residual-32"}
    for name, data in series.items():
        d = replay(server, "/diagnostics", body, model=name)
        assert data == positive_or_none([e["grad_norm"] for e in d["layers"]])
        assert len(data) == 32
    assert (
        page.evaluate(
            "() => echarts.getInstanceByDom(document.getElementById('chart-compare')).getOption().yAxis[0].type"
        )
        == "log"
    )


def test_api_errors_are_shown_as_the_api_words_them(visit: Callable[..., Visit], server: Server) -> None:
    page = visit().open()
    fill_write(page, prompt="x" * 60, max_new=30, trace=False)
    page.click("#generate")
    page.wait_for_selector("#output[data-done='error']", state="attached")
    resp = httpx.post(f"{server.url}/generate", json={"prompt": "x" * 60, "model": "tiny", "max_new_tokens": 30})
    assert resp.status_code == 400
    assert page.text_content("#error") == resp.json()["error"]["message"]
    assert page.is_visible("#error")


def test_an_error_event_in_the_stream_is_shown(visit: Callable[..., Visit]) -> None:
    """The server reports a failure after the stream has begun (a timeout, say) as `event: error`; the page keeps
    the text so far and shows the message. The stream is canned here: the live server has no way to fail on cue."""
    message = "request exceeded the 120 s timeout"
    body = (
        'event: token\ndata: {"type": "token", "text": "ab", "token": {"id": 98, "text": "b"}}\n\n'
        "event: error\ndata: "
        + json.dumps({"error": {"message": message, "type": "timeout_error", "param": None, "code": "request_timeout"}})
        + "\n\n"
    )
    page = visit().open()
    page.route("**/generate", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    fill_write(page, trace=False)
    page.click("#generate")
    page.wait_for_selector("#output[data-done='error']", state="attached")
    assert page.text_content("#error") == message
    assert page.text_content("#output") == "ab"


def test_ctrl_enter_generates_and_escape_stops(visit: Callable[..., Visit]) -> None:
    page = visit().open()
    fill_write(page, prompt="k", max_new=60, trace=False)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("() => Number(document.querySelector('#output').dataset.tokens) >= 2")
    page.keyboard.press("Escape")
    page.wait_for_selector("#output[data-done='stopped']", state="attached")
    assert int(page.get_attribute("#output", "data-tokens")) < 60
    assert page.text_content("#status").startswith("stopped after")
    assert page.is_enabled("#generate") and page.is_disabled("#stop")


@pytest.mark.parametrize("size", [(1280, 800), (390, 844)])
def test_layout_fits_the_screen(visit: Callable[..., Visit], size: tuple[int, int]) -> None:
    width, height = size
    page = visit(width=width, height=height).open()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    for hook in (
        "#prompt",
        "#model",
        "#generate",
        "#stop",
        "#output",
        "#trace-heatmap",
        "#layer-controls",
        "#steer",
        "#steer-positive",
        "#steer-again",
        "#inspect",
        "#compare",
    ):
        box = page.locator(hook).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, hook


def test_docs_pages_render_offline(visit: Callable[..., Visit]) -> None:
    v = visit()
    page = v.open("/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=TIMEOUT_MS)
    assert page.locator(".swagger-ui .opblock").count() > 5
    assert not v.foreign
    page = v.open("/redoc")
    page.wait_for_selector("h1", timeout=TIMEOUT_MS)
    assert "Shortcut" in page.text_content("h1")
    # ReDoc's sidebar shows its vendor's logo from their CDN, an <img> it hides when the load fails (as it does
    # offline): the page's CSP refuses it before any request leaves (the one outside load of the vendored file)
    assert not v.foreign  # it never reached the network (Chromium still reports the request it refused)
    v.requests = [u for u in v.requests if u != REDOC_LOGO]
    refused = [m for m in v.console if REDOC_LOGO in m and "Content Security Policy" in m]
    assert len(refused) == 1, v.console
    v.console.remove(refused[0])


def test_docs_pages_send_a_csp_that_forbids_framing(server: Server) -> None:
    """/docs, /redoc and the OAuth2 helper: a CSP (their inline script allowed by its hash only) and no framing; the
    test above renders both pages under it without a violation."""
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        r = httpx.get(server.url + path, timeout=30)
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, (path, csp)
        assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";", 1)[0], (path, csp)
        scripts = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", r.text, re.S)
        for body in scripts:  # every inline script's hash is listed, independently worked out here
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp, (path, csp)
        assert bool(scripts) == (path != "/redoc"), path


def test_api_key_is_asked_once_and_kept_in_session_storage(
    browser: object, start_server: Callable[..., Server]
) -> None:
    key = "page-key-0123456789"
    keyed = start_server(api_key=key)
    v = Visit(browser, keyed.url)
    headers: list[str | None] = []
    try:
        v.page.on(
            "request",
            lambda r: (
                headers.append(r.headers.get("authorization")) if r.url.endswith(("/v1/models", "/generate")) else None
            ),
        )
        v.page.goto("/")
        v.page.wait_for_selector("#key-dialog[open]")
        v.page.fill("#key-input", key)
        v.page.click("#key-dialog button[value='ok']")
        v.page.wait_for_selector("body[data-ready='1']")
        assert v.page.evaluate("() => sessionStorage.getItem('shortcut.apiKey')") == key
        fill_write(v.page, prompt="key ", max_new=4, trace=False)
        run_generation(v.page)
        assert v.page.locator("#key-dialog[open]").count() == 0  # asked once
        assert headers[0] is None and headers[1:] == [f"Bearer {key}"] * (len(headers) - 1) and len(headers) >= 3
        assert not any(key in u for u in v.requests)
        assert not v.foreign and not v.console, (v.foreign, v.console)
    finally:
        v.close()


def test_inspect_sends_the_generated_bytes_not_the_text(visit: Callable[..., Visit], server: Server) -> None:
    """A generation that is not valid UTF-8 (each 0xC2 alone shows as U+FFFD, three bytes) is inspected as the bytes
    the model wrote: as many tokens as prompt + generated, the same ids (issue #25)."""
    page = visit().open()

    def force_c2(route: object) -> None:  # the page has no logit_bias control: add one to its request
        body = route.request.post_data_json
        route.continue_(post_data=json.dumps({**body, "logit_bias": {"194": 100}}))

    page.route("**/generate", force_c2)
    fill_write(page, prompt="Bytes ", max_new=5, seed=1, trace=False)
    run_generation(page)
    assert page.text_content("#output") == "\ufffd" * 5
    with page.expect_request(lambda r: r.url.endswith("/diagnostics")) as req:
        page.click("#inspect-run")
    page.wait_for_selector("#inspect[data-state='done'], #inspect[data-state='error']")
    assert page.get_attribute("#inspect", "data-state") == "done", page.text_content("#error")
    assert req.value.post_data_json["tokens"] == list(b"Bytes ") + [194] * 5
    assert page.text_content("#inspect-status").startswith("11 tokens")


def test_a_wrong_key_is_asked_for_again_and_the_models_then_load(
    browser: object, start_server: Callable[..., Server]
) -> None:
    key = "page-key-again-0123"
    keyed = start_server(api_key=key)
    v = Visit(browser, keyed.url)
    try:
        v.page.goto("/")
        v.page.wait_for_selector("#key-dialog[open]")
        v.page.fill("#key-input", "mistyped")
        v.page.click("#key-dialog button[value='ok']")
        v.page.wait_for_selector("#key-dialog[open]")  # the 401 of the wrong key asks again, with the reason
        assert v.page.text_content("#key-reason")
        v.page.fill("#key-input", key)
        v.page.click("#key-dialog button[value='ok']")
        v.page.wait_for_selector("body[data-ready='1']")
        assert v.page.locator("#model option").count() >= 1
        fill_write(v.page, prompt="key ", max_new=3, trace=False)
        run_generation(v.page)
        # the key goes stale (another tab, a rotated key): the next 401 asks again; cancelling keeps the error
        v.page.evaluate("() => sessionStorage.setItem('shortcut.apiKey', 'stale')")
        v.page.click("#generate")
        v.page.wait_for_selector("#key-dialog[open]")
        v.page.fill("#key-input", key)
        v.page.click("#key-dialog button[value='ok']")
        v.page.wait_for_function("() => !document.querySelector('#key-dialog[open]')")
    finally:
        v.close()


def test_first_difference_counts_from_1_like_the_lengths(visit: Callable[..., Visit]) -> None:
    page = visit().open()
    fill_write(page, prompt="Switch ", max_new=16, seed=11, trace=False)
    run_generation(page)
    page.uncheck("#layer-controls [data-layer='0'] [data-part='block']")
    run_generation(page, "#again")
    at = int(page.get_attribute("#diff-note", "data-first"))  # the 0-based index
    note = page.text_content("#diff-note")
    assert f"First difference at character {at + 1} (of " in note and "counted from 1" in note
    assert page.get_attribute("#diff-right mark", "title") == f"first difference: character {at + 1}"


def test_a_layer_list_that_scrolls_says_so(visit: Callable[..., Visit], server: Server) -> None:
    """The Intervene list scrolls when the model has more layers than fit: a hint names them until the last is seen."""
    page = visit().open()
    box = "#layer-controls"
    fits = page.evaluate(
        f"() => {{ const b = document.querySelector('{box}'); return b.scrollHeight <= b.clientHeight; }}"
    )
    assert fits and page.is_hidden("#layer-controls-hint")  # the tiny model's few layers fit
    page.select_option("#model", "residual-32")
    page.wait_for_function("() => document.querySelectorAll('#layer-controls [data-layer]').length === 32")
    assert page.is_visible("#layer-controls-hint")
    assert "32 layers, L0–L31" in page.text_content("#layer-controls-hint")
    page.evaluate(f"() => {{ const b = document.querySelector('{box}'); b.scrollTop = b.scrollHeight; }}")
    page.wait_for_selector("#layer-controls-hint", state="hidden")


def test_the_compare_zero_label_is_clear_of_the_other_line(visit: Callable[..., Visit], server: Server) -> None:
    """The "plain-32: exactly 0" label sits where the residual-32 line does not pass (within 24 px of its edge)."""
    page = visit().open()
    page.fill("#prompt", "ROMEO: But soft")
    page.click("#compare-run")
    page.wait_for_selector("#compare[data-state='done']")
    got = page.evaluate(
        """() => {
      const c = echarts.getInstanceByDom(document.getElementById('chart-compare'));
      const opt = c.getOption();
      const plain = opt.series.findIndex(s => s.name === 'plain-32');
      const other = opt.series.findIndex(s => s.name === 'residual-32');
      const area = opt.series[plain].markArea;
      const rect = c.getModel().getComponent('grid').coordinateSystem.getRect();
      const [a, b] = [Number(area.data[0][0].xAxis), Number(area.data[0][1].xAxis)];
      const ys = [];
      for (let l = a; l <= b; l++) {
        const v = opt.series[other].data[l];
        if (v !== null && v !== undefined) ys.push(c.convertToPixel({seriesIndex: other}, [l, v])[1]);
      }
      return {position: area.label.position, top: rect.y, bottom: rect.y + rect.height, ys};
    }"""
    )
    assert got["ys"], got
    if got["position"] == "insideBottom":
        band = (got["bottom"] - 24, got["bottom"])
    else:
        assert got["position"] == "insideTop", got
        band = (got["top"], got["top"] + 24)
    assert not [y for y in got["ys"] if band[0] <= y <= band[1]], got


def test_the_lens_chart_and_the_heatmap_tooltip_switch_to_the_tuned_lens(
    visit: Callable[..., Visit], server: Server
) -> None:
    v = visit()
    page = v.open()
    page.select_option("#model", "tiny")  # no tuned lens: the choice is not offered
    assert page.is_disabled("#lens-kind option[value='tuned']") and page.is_disabled("#lens-view option[value='tuned']")
    fill_write(page, prompt="ROMEO:", model="residual-32", max_new=5, seed=2, lens_top=2)
    page.select_option("#lens-kind", "tuned")
    sent = run_generation(page)
    assert sent["lens"] == "tuned" and sent["logit_lens_top"] == 2
    expected = replay(server, "/generate", sent, stream=False)
    hover_cell(page, 1, 3)
    tip = page.text_content("#heatmap-tip")
    tops = expected["trace"]["tokens"][1]["logit_lens"][3]
    assert expected["trace"]["tokens"][1]["lens"] == "tuned"
    assert "tuned lens: " + ", ".join(f"{json.dumps(t['text'])} {t['prob']:.4g}" for t in tops) in tip, tip

    with page.expect_request(lambda r: r.url.endswith("/diagnostics")) as req:
        page.click("#inspect-run")
    page.wait_for_selector("#inspect[data-state='done'], #inspect[data-state='error']")
    assert page.get_attribute("#inspect", "data-state") == "done", page.text_content("#error")
    body = req.value.post_data_json
    assert body["tuned_lens"] == 3 and body["logit_lens"] == 3
    layers = replay(server, "/diagnostics", body)["layers"]

    def columns() -> tuple[str, dict[tuple[int, int], float]]:
        (series,) = chart_series(page, "chart-lens")
        return series["name"], {(x, y): p for x, y, p in series["data"]}

    name, cells = columns()  # the logit lens: the trace read the tuned one, so /diagnostics' column alone
    assert name == "logit lens" and sorted({x for x, _ in cells}) == [0]
    assert [cells[(0, layer)] for layer in range(32)] == [e["logit_lens"]["top"][0]["prob"] for e in layers]
    page.select_option("#lens-view", "tuned")
    name, cells = columns()  # one column per generated token, then /diagnostics' last position
    assert name == "tuned lens" and sorted({x for x, _ in cells}) == list(range(5 + 1))
    assert [cells[(5, layer)] for layer in range(32)] == [e["tuned_lens"]["top"][0]["prob"] for e in layers]
    for col, token in enumerate(expected["trace"]["tokens"]):
        assert [cells[(col, layer)] for layer in range(32)] == [top[0]["prob"] for top in token["logit_lens"]]


def test_patch_draws_what_patching_returns(visit: Callable[..., Visit], server: Server) -> None:
    page = visit().open()
    page.fill("#patch-clean", "The cat sat")
    page.fill("#patch-corrupt", "The bat sat")
    page.fill("#patch-target", "e")
    page.check(".patch-site[value='resid_post']")
    with page.expect_request(lambda r: r.url.endswith("/patching")) as req:
        page.click("#patch-run")
    page.wait_for_selector("#patch[data-state='done'], #patch[data-state='error']")
    assert page.get_attribute("#patch", "data-state") == "done", page.text_content("#error")
    body = req.value.post_data_json
    assert body == {
        "model": "tiny",
        "clean": "The cat sat",
        "corrupt": "The bat sat",
        "target": "e",
        "sites": ["resid_pre", "resid_post"],
    }
    r = replay(server, "/patching", body)
    for site in ("resid_pre", "resid_post"):
        (series,) = chart_series(page, f"chart-patch-{site}")
        want = [[p, l, v] for l, row in enumerate(r["sites"][site]) for p, v in enumerate(row)]
        assert series["type"] == "heatmap" and series["data"] == want
    assert page.locator("#patch-charts figure").count() == 2
    assert "4:c/b" in page.evaluate(
        "() => echarts.getInstanceByDom(document.getElementById('chart-patch-resid_pre')).getOption().xAxis[0].data"
    )
