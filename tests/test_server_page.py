"""The page of scripts/serve.py in headless Chromium against the demo model: progress, img2img, inpainting, Reuse,
errors. Skipped where playwright or /usr/bin/chromium is absent (`make test` tries to install Chromium)."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (requirements-server-test.txt)"
)
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; `make test` installs it)", allow_module_level=True)

expect = sync_api.expect
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = "8"
RESULTS = "[data-testid=result]"
GENERATION_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    yield page
    page.close()


def decode_png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def newest_result_png(page) -> str:
    """Base64 PNG of the gallery's newest image (the page puts new results first)."""
    src = page.locator(f"{RESULTS} [data-testid=result-image]").first.get_attribute("src")
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return src[len(prefix) :]


def generate(page, endpoint: str = "txt2img") -> tuple[dict, str]:
    """Presses Generate and waits for the batch's results; returns the request's JSON and the newest image (base64)."""
    expected = page.locator(RESULTS).count() + int(page.input_value("#batch-size"))
    with page.expect_request(f"**/sdapi/v1/{endpoint}") as request:
        page.click("#generate")
    expect(page.locator(RESULTS)).to_have_count(expected, timeout=GENERATION_TIMEOUT_MS)
    return request.value.post_data_json, newest_result_png(page)


def write_init_image(path: Path) -> np.ndarray:
    """A 64x64 RGB test card (colour gradients and a block) saved as PNG at `path`; returns its pixels (64, 64, 3)."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.uint8)
    pixels[40:56, 40:56] = (250, 220, 30)
    Image.fromarray(pixels).save(path)
    return pixels


def upload_init(page, mode: str, path: Path) -> None:
    page.check(f"#mode-{mode}")
    page.set_input_files("#init-image", str(path))
    expect(page.locator("#init-stage")).to_be_visible()


def test_txt2img_shows_progress_and_a_png_in_the_gallery(page):
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "30")
    page.fill("#seed", "7")
    # Every value the bar and the preview take, recorded in the page itself so that none is missed between polls.
    page.evaluate(
        """() => {
            window.progressValues = [];
            window.previews = [];
            const bar = document.getElementById("progress-bar");
            const preview = document.getElementById("preview");
            new MutationObserver(() => window.progressValues.push(Number(bar.getAttribute("aria-valuenow"))))
                .observe(bar, {attributes: true, attributeFilter: ["aria-valuenow"]});
            new MutationObserver(() => window.previews.push(preview.src))
                .observe(preview, {attributes: true, attributeFilter: ["src"]});
        }"""
    )
    request, image = generate(page)

    values = page.evaluate("window.progressValues")
    assert any(0 < v < 100 for v in values), f"the bar never showed a step in between: {values}"
    assert values[-1] == 100
    previews = page.evaluate("window.previews")
    assert previews, "no live preview was shown"
    assert decode_png(previews[-1].removeprefix("data:image/png;base64,")).size == (64, 64)
    assert page.get_attribute("#progress-bar", "style") == "width: 100%;"
    png = decode_png(image)
    assert png.size == (64, 64)
    result = page.locator(RESULTS).first
    expect(result.locator("[data-testid=seed]")).to_have_text("7")
    expect(result.locator("[data-testid=infotext]")).to_contain_text("a red circle on a blue background")
    assert request["prompt"] == "a red circle on a blue background" and request["steps"] == 30
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "server-page.png"), full_page=True)


def test_img2img_sends_the_uploaded_image(page, tmp_path):
    path = tmp_path / "init.png"
    write_init_image(path)
    upload_init(page, "img2img", path)
    page.fill("#prompt", "a green square on a white background")
    page.fill("#steps", STEPS)
    page.fill("#denoising-strength", "0.6")
    request, image = generate(page, "img2img")

    assert request["init_images"] == [base64.b64encode(path.read_bytes()).decode()]
    assert request["denoising_strength"] == 0.6 and "mask" not in request
    assert decode_png(image).size == (64, 64)


def paint(page, points: list[tuple[float, float]]) -> None:
    """Drags the mouse through `points`, given in image pixels of the 64x64 init image, on the mask canvas."""
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    scale = box["width"] / 64
    page.mouse.move(box["x"] + points[0][0] * scale, box["y"] + points[0][1] * scale)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=4)
    page.mouse.up()


def inpaint(page, tmp_path: Path) -> tuple[np.ndarray, dict, str]:
    """Uploads the test card, paints a square ring around (20, 20) and inpaints; the card (64, 64, 3), the request's
    JSON and the result (base64)."""
    path = tmp_path / "init.png"
    init = write_init_image(path)
    upload_init(page, "inpaint", path)
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", STEPS)
    page.fill("#denoising-strength", "1")
    page.fill("#mask-blur", "0")
    page.fill("#brush-size", "12")
    page.fill("#seed", "-1")
    paint(page, [(10, 10), (30, 10), (30, 30), (10, 30), (10, 10), (20, 20)])
    request, image = generate(page, "img2img")
    return init, request, image


def test_inpaint_repaints_only_the_painted_mask(page, tmp_path):
    init, request, image = inpaint(page, tmp_path)
    init = init.astype(int)

    mask = np.asarray(decode_png(request["mask"]).convert("L"))
    assert mask.shape == (64, 64) and mask[20, 20] == 255 and mask[50, 50] == 0 and mask[10, 30] == 255
    assert request["mask_blur"] == 0 and request["inpainting_fill"] == 1
    result = np.asarray(decode_png(image).convert("RGB")).astype(int)
    assert result.shape == init.shape
    keep, repaint = mask == 0, mask == 255
    assert np.array_equal(result[keep], init[keep]), "the unmasked region changed"
    assert np.abs(result[repaint] - init[repaint]).mean() > 10, "the masked region was not repainted"


def test_reuse_of_an_inpainting_restores_its_image_and_mask(page, tmp_path):
    _, first_request, first = inpaint(page, tmp_path)
    page.click("#clear-mask")
    page.check("#mode-txt2img")
    page.fill("#seed", "-1")
    page.locator(f"{RESULTS} [data-testid=reuse]").first.click()
    expect(page.locator("#mode-inpaint")).to_be_checked()
    expect(page.locator("#mask-canvas")).to_be_visible()

    request, again = generate(page, "img2img")
    assert request["init_images"] == first_request["init_images"]
    assert request["mask"] == first_request["mask"]
    assert base64.b64decode(again) == base64.b64decode(first)


def test_reuse_restores_the_parameters_and_the_same_image(page):
    page.fill("#prompt", "a blue triangle on a yellow background")
    page.fill("#steps", STEPS)
    sampler = page.locator("#sampler option").nth(1).get_attribute("value")
    page.select_option("#sampler", sampler)
    page.fill("#seed", "-1")
    _, first = generate(page)
    seed = int(page.locator(f"{RESULTS} [data-testid=seed]").first.inner_text())

    page.fill("#prompt", "something else")
    page.fill("#steps", "3")
    page.select_option("#sampler", index=0)
    page.fill("#seed", "-1")
    page.locator(f"{RESULTS} [data-testid=reuse]").first.click()
    assert page.input_value("#prompt") == "a blue triangle on a yellow background"
    assert page.input_value("#steps") == STEPS
    assert page.input_value("#sampler") == sampler
    assert int(page.input_value("#seed")) == seed != -1

    request, again = generate(page)
    assert request["seed"] == seed
    assert base64.b64decode(again) == base64.b64decode(first)


def test_interrupt_ends_the_run_early_with_an_image(page):
    page.fill("#prompt", "a red circle on a blue background")
    # The full run would take far longer than GENERATION_TIMEOUT_MS: only an interrupted one answers in time.
    page.fill("#steps", "1000")
    with page.expect_response("**/sdapi/v1/txt2img", timeout=GENERATION_TIMEOUT_MS) as response:
        page.click("#generate")
        page.wait_for_function("Number(document.getElementById('progress-bar').getAttribute('aria-valuenow')) > 0")
        stopped_at = int(page.get_attribute("#progress-bar", "aria-valuenow"))
        with page.expect_request("**/sdapi/v1/interrupt"):
            page.click("#interrupt")
    assert response.value.ok
    expect(page.locator(RESULTS)).to_have_count(1)
    assert decode_png(newest_result_png(page)).size == (64, 64)
    assert stopped_at < 50, "the run was nearly done before Interrupt; the test needs more steps"
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#interrupt")).to_be_disabled()


@pytest.mark.parametrize(("selector", "value", "field"), [("#steps", "0", "steps"), ("#width", "60", "width")])
def test_an_invalid_value_shows_the_servers_error(page, selector, value, field):
    page.fill("#steps", STEPS)
    page.fill(selector, value)
    with page.expect_response("**/sdapi/v1/txt2img") as response:
        page.click("#generate")
    assert 400 <= response.value.status < 500
    body = json.loads(response.value.text())
    assert body["field"] == field
    expect(page.locator("#error")).to_contain_text(body["detail"])
    expect(page.locator(selector)).to_have_attribute("aria-invalid", "true")
    expect(page.locator(RESULTS)).to_have_count(0)
