"""The browser console at /ui, driven in headless Chromium (Debian's chromium and chromium-driver)
against the shared dev app. Tiny jobs finish in about a second, so the tests assert on what the
console recorded and rendered, not on timing. Screenshots of the main views go to
test-artifacts/console/."""

import itertools
import shutil
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.integration.jobs import submit, wait_finished

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("chromedriver") is None,
                       reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"),
]
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts" / "console"
VISITS = itertools.count()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # As root, on a machine with no display and no outside network.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture
def console(browser, dev_app):
    base = str(dev_app["client"].base_url).rstrip("/")

    def open_view(hash_: str):
        # A fresh page each time (a new query string), not a hash change within the last test's page.
        browser.get(f"{base}/ui/?visit={next(VISITS)}{hash_}")
        wait_until(lambda: browser.execute_script("return window.genserve && window.genserve.ready"), 30,
                   what="the console to start")
        return browser

    return open_view


def _by_id(browser, element_id):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def _text(browser, element_id) -> str:
    return _by_id(browser, element_id).text


def _fill(browser, element_id, value) -> None:
    field = _by_id(browser, element_id)
    field.clear()
    field.send_keys(str(value))


def _errors(browser) -> str:
    return browser.execute_script(
        "return [...document.querySelectorAll('.error')].map(e => e.id + ': ' + e.textContent).filter(t => !t.endsWith(': ')).join('; ')")


def _submitted(browser) -> None:
    wait_until(lambda: "#/jobs/" in browser.current_url, 30, what=f"the job page (errors: {_errors(browser)})")


def _wait_state(browser, state: str, timeout_s: float = 120) -> None:
    wait_until(lambda: _text(browser, "job-state") == state, timeout_s, what=f"the job page to say {state}")


def test_an_image_generated_from_the_form_appears_with_its_scores(console):
    browser = console("#/generate")
    wait_until(lambda: _by_id(browser, "f-model").get_attribute("value") == "flux-schnell", 30, what="models loaded")
    _fill(browser, "f-prompt", "a lighthouse on a cliff at dusk")
    _fill(browser, "f-seed", 7)
    _by_id(browser, "submit").click()
    _submitted(browser)
    _wait_state(browser, "succeeded")
    wait_until(lambda: browser.find_elements("css selector", ".result-image img"), 30, what="the image")
    card = browser.find_element("css selector", ".result-image")
    assert "aesthetic" in card.text and "alignment" in card.text and "seed 7" in card.text
    assert "The model saw:" in _text(browser, "job-result")
    loaded = browser.execute_script("const img = document.querySelector('.result-image img');"
                                    "return img.complete && img.naturalWidth;")
    assert loaded == 256
    browser.save_screenshot(str(ARTIFACTS / "result.png"))


def test_a_bad_field_shows_its_422_message_beside_the_field(console):
    browser = console("#/generate")
    wait_until(lambda: _by_id(browser, "f-model").get_attribute("value"), 30, what="models loaded")
    _fill(browser, "f-prompt", "a fox")
    _fill(browser, "f-width", 300)
    _by_id(browser, "submit").click()
    wait_until(lambda: _text(browser, "err-width"), 30, what="the width error")
    assert "multiple of 16" in _text(browser, "err-width")
    assert _by_id(browser, "f-width").get_attribute("aria-invalid") == "true"
    assert "#/generate" in browser.current_url  # nothing was submitted
    browser.save_screenshot(str(ARTIFACTS / "generate-error.png"))


def test_markup_in_a_prompt_is_shown_as_text(console, dev_app):
    prompt = '<b id="injected">bold</b><img src=x onerror="window.pwned=1">'
    job = submit(dev_app["client"], "image", {"prompt": prompt, "seed": 3, "enhance": False})
    wait_finished(dev_app["client"], job["id"])
    browser = console(f"#/jobs/{job['id']}")
    wait_until(lambda: "You wrote:" in _text(browser, "job-result"), 60, what="the result")
    assert prompt in _text(browser, "job-result")
    assert not browser.find_elements("id", "injected")
    assert browser.execute_script("return window.pwned === undefined")


def test_a_video_jobs_progress_advances_and_its_video_loads(console):
    browser = console("#/generate")
    browser.find_element("css selector", 'input[name="kind"][value="video"]').click()
    _fill(browser, "f-prompt", "a paper boat on a pond")
    _fill(browser, "f-num_frames", 3)
    _fill(browser, "f-num_inference_steps", 6)
    _fill(browser, "f-seed", 5)
    _by_id(browser, "submit").click()
    _submitted(browser)
    job_id = browser.current_url.rsplit("/", 1)[1]
    _wait_state(browser, "succeeded", 180)
    recorded = browser.execute_script("return window.genserve.progress[arguments[0]] || []", job_id)
    video_steps = [event["step"] for event in recorded if event["stage"] == "video"]
    # Reports are throttled and the last may race the final state; what arrived must advance.
    assert len(set(video_steps)) >= 2 and video_steps == sorted(video_steps), recorded
    wait_until(lambda: browser.execute_script(
        "const v = document.getElementById('result-video'); return v && v.readyState >= 1 && v.duration > 0"),
        30, what="the video to load")


def test_the_video_form_picks_a_video_model_and_interpolation_and_shows_its_rules(console):
    browser = console("#/generate")
    browser.find_element("css selector", 'input[name="kind"][value="video"]').click()
    wait_until(lambda: _by_id(browser, "f-video_model").get_attribute("value"), 30, what="video models loaded")
    browser.execute_script("const s = document.getElementById('f-video_model'); s.value = 'ltx-video';"
                           "s.dispatchEvent(new Event('change'));")
    assert "8k+1 frames between 9 and 257" in _text(browser, "hint-video_model")
    _fill(browser, "f-num_frames", 12)  # breaks ltx's frame rule: the 422 shows beside the field
    _fill(browser, "f-prompt", "a red kite over a beach")
    _by_id(browser, "submit").click()
    wait_until(lambda: "nearest: 9 or 17" in _text(browser, "err-num_frames"), 30, what="the frame rule's 422")
    _fill(browser, "f-num_frames", 9)
    browser.execute_script("document.getElementById('f-interpolate').value = '2';")
    _by_id(browser, "submit").click()
    _submitted(browser)
    _wait_state(browser, "succeeded", 180)
    wait_until(lambda: "ltx-video: 17 frames at 48 fps (9 generated, interpolated 2x)" in _text(browser, "job-result"),
               30, what="the video's summary")


def test_an_sdxl_job_shows_denoising_previews(console):
    browser = console("#/generate")
    wait_until(lambda: _by_id(browser, "f-model").get_attribute("value"), 30, what="models loaded")
    browser.execute_script("const s = document.getElementById('f-model'); s.value = 'sdxl';"
                           "s.dispatchEvent(new Event('change'));")
    _fill(browser, "f-prompt", "a red house in a field")
    _fill(browser, "f-num_inference_steps", 12)
    _by_id(browser, "submit").click()
    _submitted(browser)
    job_id = browser.current_url.rsplit("/", 1)[1]
    _wait_state(browser, "succeeded", 120)
    recorded = browser.execute_script("return window.genserve.progress[arguments[0]] || []", job_id)
    assert any(event["preview"] for event in recorded), recorded
    assert _by_id(browser, "job-preview").get_attribute("src").startswith("data:image/png;base64,")
    browser.save_screenshot(str(ARTIFACTS / "job.png"))


def test_a_running_job_is_cancelled_from_its_page(console, dev_app):
    long = submit(dev_app["client"], "video", {"prompt": "a slow river", "num_frames": 3, "num_inference_steps": 100})
    browser = console(f"#/jobs/{long['id']}")
    wait_until(lambda: _text(browser, "job-state") == "running", 120, what="the job to run")
    _by_id(browser, "job-cancel").click()
    _wait_state(browser, "cancelled", 120)
    assert not _by_id(browser, "job-cancel").is_displayed()


def test_the_job_list_pages_and_filters(console, dev_app):
    for seed in range(3):
        wait_finished(dev_app["client"], submit(dev_app["client"], "image", {"prompt": "a fox", "seed": seed})["id"])
    browser = console("#/jobs")
    browser.execute_script("const s = document.getElementById('jobs-limit'); s.value = '5';"
                           "s.dispatchEvent(new Event('change'));")
    wait_until(lambda: len(browser.find_elements("css selector", ".job-row")) == 5, 30, what="a page of 5")
    first = [row.text for row in browser.find_elements("css selector", ".job-row")]
    _by_id(browser, "jobs-next").click()
    wait_until(lambda: _text(browser, "jobs-page") == "page 2", 30, what="page 2")
    second = [row.text for row in browser.find_elements("css selector", ".job-row")]
    assert second and not set(first) & set(second)
    browser.execute_script("const s = document.getElementById('jobs-state'); s.value = 'succeeded';"
                           "s.dispatchEvent(new Event('change'));")
    wait_until(lambda: _text(browser, "jobs-page") == "page 1", 30, what="back to page 1")
    states = {row.find_elements("css selector", "td")[2].text for row in browser.find_elements("css selector", ".job-row")}
    assert states == {"succeeded"}
    browser.save_screenshot(str(ARTIFACTS / "jobs.png"))


def test_the_gallery_shows_finished_images_and_the_console_fits_a_phone(console):
    browser = console("#/gallery")
    wait_until(lambda: browser.find_elements("css selector", "#gallery img"), 60, what="gallery images")
    browser.set_window_size(390, 844)
    try:
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390 + 1, "the console scrolls sideways at phone width"
        browser.save_screenshot(str(ARTIFACTS / "gallery-phone.png"))
    finally:
        browser.set_window_size(1280, 1000)


def test_gallery_images_are_picked_as_references_for_an_edit_by_instruction(console, dev_app):
    from selenium.webdriver.support.ui import Select

    client = dev_app["client"]
    fast = {"model": "flux2-klein", "num_inference_steps": 2, "enhance": False}
    source = submit(client, "image", {**fast, "prompt": "a mug on a desk", "seed": 5})
    wait_finished(client, source["id"])
    browser = console("#/gallery")  # newest first: the job above is the first card
    wait_until(lambda: browser.find_elements("css selector", "#gallery .use-reference"), 60, what="a pickable image")
    button = browser.find_element("css selector", "#gallery .use-reference")
    button.click()
    assert button.get_attribute("aria-pressed") == "true"
    browser.find_element("css selector", 'nav a[data-view="generate"]').click()  # the same page: picks are kept
    wait_until(lambda: _by_id(browser, "f-model").get_attribute("value"), 30, what="models loaded")
    assert not _by_id(browser, "references-fieldset").is_displayed(), "flux-schnell takes no references"
    Select(_by_id(browser, "f-model")).select_by_value("flux2-klein")
    wait_until(lambda: _by_id(browser, "references-fieldset").is_displayed(), 10, what="the references")
    assert f"job {source['id']}, image 0" in _text(browser, "references")
    _fill(browser, "f-prompt", "make it night")
    _fill(browser, "f-num_inference_steps", 2)
    _by_id(browser, "submit").click()
    _submitted(browser)
    _wait_state(browser, "succeeded")
    job_id = browser.current_url.split("#/jobs/")[1]
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["mode"] == "instruction-edit" and result["model"] == "flux2-klein"
    browser.save_screenshot(str(ARTIFACTS / "references.png"))
