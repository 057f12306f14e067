"""webapp.py: Streamlit's AppTest sets the widgets and runs the script; then a real headless Chromium drives
`streamlit run webapp.py` on 127.0.0.1, with every host but loopback unresolvable (the page must work offline).

The browser test skips where chromium or chromedriver is missing, unless IAG_REQUIRE_BROWSER=1 (.ci/run sets
it), which turns the skip into a failure.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, free_port
from streamlit.testing.v1 import AppTest

import image_gen

SCRIPT = str(ROOT / "webapp.py")


def tone_wav(seconds: float = 1.5, amplitude: float = 0.3) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    buffer = io.BytesIO()
    sf.write(buffer, amplitude * np.sin(2 * np.pi * (220 * t + 3 * np.sin(2 * np.pi * 2 * t))), 16_000, format="WAV")
    return buffer.getvalue()


def page(monkeypatch, vae: str) -> AppTest:
    """The page on the shipped models, named by path where the test names none: after `make demo` the defaults are
    the demo's, whose figures no benchmark measured."""
    for model, name in (("IMAGE", "diffusion_model.pt"), ("GAN", "gan_model.pt"), ("AUDIO", "audio_autoencoder.pt")):
        if f"IAG_{model}_CHECKPOINT" not in os.environ:
            monkeypatch.setenv(f"IAG_{model}_CHECKPOINT", str(ROOT / "models" / "pretrained" / name))
    monkeypatch.setenv("IAG_VAE_CHECKPOINT", vae)
    at = AppTest.from_file(SCRIPT, default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture()
def app(monkeypatch) -> AppTest:
    """The page without a VAE, whether or not one is trained or shipped."""
    return page(monkeypatch, "none")


@pytest.fixture()
def vae_app(monkeypatch, tiny_vae) -> AppTest:
    return page(monkeypatch, str(tiny_vae))


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


# ----------------------------------------------------------------------------
# AppTest: the script with its widgets set, no browser
# ----------------------------------------------------------------------------
def test_page_shows_both_tabs_and_the_measured_figures_of_the_default_setting(app):
    assert [tab.label for tab in app.tabs] == ["Digits", "Audio"]
    assert app.selectbox(key="sampler").value == "ddim" and app.slider(key="steps").value == 50
    assert app.slider(key="guidance").value == image_gen.DEFAULT_GUIDANCE
    assert app.metric[0].value == "12.2"  # FID-1k of DDIM-50, eta 0, guidance 1.5 (the CLI's default): the README's
    app.slider(key="guidance").set_value(1.0)
    app.slider(key="num_samples").set_value(1)
    app.button[0].click()  # the form's settings (and so the figures) take effect when it is submitted
    app.run()
    assert app.metric[0].value == "12.7" and app.metric[1].value == "≈ 50 ms"
    assert not app.error


def test_the_figures_are_shown_for_the_shipped_model_only(monkeypatch, tmp_path):
    state = torch.load(image_gen.PRETRAINED_DIR / "diffusion_model.pt", weights_only=True)
    torch.save({**state, "note": "the same weights, another file"}, tmp_path / "mine.pt")
    monkeypatch.setenv("IAG_IMAGE_CHECKPOINT", str(tmp_path / "mine.pt"))
    at = page(monkeypatch, "none")
    assert_clean(at)
    assert at.metric[0].value == "—" and at.metric[1].value == "≈ 100 ms"


def test_generate_draws_the_grid_and_the_animation(app):
    app.selectbox(key="digit").set_value(7)
    app.slider(key="num_samples").set_value(4)
    app.slider(key="steps").set_value(3)
    app.button[0].click()  # the form's Generate
    app.run()
    assert_clean(app)
    assert app.get("status")[0].proto.label.startswith("Drew 4 digits")
    assert len(app.image) == 2 and len(app.get("download_button")) == 2
    assert app.metric[0].value == "—"  # DDIM-3 has no benchmark figure


def test_the_gan_draws_beside_diffusion_when_one_is_served(app):
    if "gan" not in app.radio(key="model").options:
        pytest.skip("no GAN checkpoint is trained or shipped (models/gan_model.pt, models/pretrained/gan_model.pt)")
    app.radio(key="model").set_value("gan").run()
    assert app.selectbox(key="sampler").options == ["gan"]
    app.button[0].click()
    app.run()
    assert_clean(app)
    assert len(app.image) == 2 and app.image[1].proto.imgs[0].caption.startswith("latent walk")


def test_generate_refuses_what_the_api_refuses_with_one_message(app):
    app.selectbox(key="sampler").set_value("ddpm")
    app.slider(key="num_samples").set_value(20)  # 20 x 1000 steps > 10,000
    app.button[0].click()
    app.run()
    assert_clean(app)
    assert len(app.error) == 1 and "exceeds" in app.error[0].value
    assert not app.image


def test_reconstruct_shows_spectrograms_players_and_metrics(app):
    app.file_uploader(key="upload").set_value(("tone.wav", tone_wav(), "audio/wav"))
    app.slider(key="griffin_lim_iters").set_value(4)
    app.checkbox(key="speech").uncheck()
    app.run()
    app.button(key="reconstruct").click()
    app.run()
    assert_clean(app)
    assert not app.error
    assert len(app.get("audio")) == 2 and len(app.image) == 1  # the two players, the spectrogram figure
    table = app.table[0].value
    assert list(table.columns) == ["metric", "autoencoder", "Griffin-Lim ceiling"]
    assert float(table["autoencoder"][0]) > 0  # spectral convergence


def test_a_microphone_recording_is_reconstructed_too(app):
    app.radio(key="source").set_value("Record with the microphone").run()
    app.audio_input(key="recording").set_value(("recording.wav", tone_wav(1.0), "audio/wav"))
    app.slider(key="griffin_lim_iters").set_value(2)
    app.checkbox(key="speech").uncheck()
    app.run()
    app.button(key="reconstruct").click()
    app.run()
    assert_clean(app)
    assert not app.error and len(app.get("audio")) == 2


@pytest.mark.parametrize("content, words", [(b"this is not audio\n" * 50, "does not decode"),
                                            (tone_wav(amplitude=0.0), "silent"), (tone_wav(0.2), "lasts")])
def test_bad_upload_gets_one_clear_message_and_no_traceback(app, content, words):
    app.file_uploader(key="upload").set_value(("clip.wav", content, "audio/wav"))
    app.run()
    app.button(key="reconstruct").click()
    app.run()
    assert_clean(app)
    assert len(app.error) == 1 and words in app.error[0].value
    assert not app.get("audio")


# ----------------------------------------------------------------------------
# AppTest: the audio VAE's tab
# ----------------------------------------------------------------------------
def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def test_the_vae_tab_appears_where_a_vae_is_served(vae_app):
    assert [tab.label for tab in vae_app.tabs] == ["Digits", "Audio", "Audio VAE"]
    assert vae_app.selectbox(key="vae_prior").options == ["mixture", "standard"]
    assert not vae_app.error


def test_a_named_vae_that_does_not_load_is_one_message_and_the_rest_works(monkeypatch):
    at = page(monkeypatch, str(ROOT / "models" / "pretrained" / "audio_autoencoder.pt"))
    assert [tab.label for tab in at.tabs] == ["Digits", "Audio"]
    assert len(at.error) == 1 and "autoencoder" in at.error[0].value


def test_an_audio_checkpoint_that_is_a_folder_is_one_message_in_its_tab(monkeypatch, tmp_path):
    monkeypatch.setenv("IAG_AUDIO_CHECKPOINT", str(tmp_path))
    at = page(monkeypatch, "none")
    assert len(at.error) == 1 and "is a folder" in at.error[0].value
    assert at.selectbox(key="sampler").value == "ddim"  # the Digits tab still works


def test_a_truncated_image_checkpoint_is_one_message_and_audio_still_works(monkeypatch, tmp_path):
    truncated = tmp_path / "diffusion_model.pt"
    truncated.write_bytes((ROOT / "models" / "pretrained" / "diffusion_model.pt").read_bytes()[:4096])
    monkeypatch.setenv("IAG_IMAGE_CHECKPOINT", str(truncated))
    at = page(monkeypatch, "none")
    assert len(at.error) == 1 and "readable" in at.error[0].value
    assert at.radio(key="source").value == "Upload a file"  # the Audio tab still works


@pytest.mark.parametrize("threads", ["many", "0", "1e9"])
def test_a_bad_thread_count_in_the_environment_is_one_message(monkeypatch, threads):
    monkeypatch.setenv("IAG_TORCH_THREADS", threads)
    at = page(monkeypatch, "none")
    assert len(at.error) == 1 and "IAG_TORCH_THREADS" in at.error[0].value and not at.tabs


def test_vae_sample_shows_the_mel_grid_and_a_player_per_clip(vae_app):
    vae_app.slider(key="vae_num_samples").set_value(3)
    vae_app.slider(key="vae_seconds").set_value(1.0)
    vae_app.slider(key="vae_griffin_lim_iters").set_value(2)
    vae_app.selectbox(key="vae_prior").set_value("standard")
    button(vae_app, "Sample").click()
    vae_app.run()
    assert_clean(vae_app)
    assert not vae_app.error
    assert any(s.proto.label.startswith("Drew 3 clips") for s in vae_app.get("status"))
    assert len(vae_app.get("audio")) == 3 and len(vae_app.image) == 1  # three players, one mel grid
    assert any(b.proto.label.startswith("Download the clips") for b in vae_app.get("download_button"))
    assert "standard prior" in " ".join(c.value for c in vae_app.caption)
    assert not vae_app.get("json")  # nothing printed by Streamlit's magic (a bare expression's value)


def test_vae_sample_refuses_what_the_api_refuses(vae_app):
    vae_app.slider(key="vae_num_samples").set_value(16)
    vae_app.slider(key="vae_seconds").set_value(5.0)  # 80 s of audio > 30 s
    button(vae_app, "Sample").click()
    vae_app.run()
    assert_clean(vae_app)
    assert len(vae_app.error) == 1 and "exceeds 30 s" in vae_app.error[0].value
    assert not vae_app.get("audio")


def test_vae_interpolate_walks_between_two_uploads(vae_app):
    vae_app.file_uploader(key="vae_a").set_value(("a.wav", tone_wav(1.5), "audio/wav"))
    vae_app.file_uploader(key="vae_b").set_value(("b.wav", tone_wav(1.2, amplitude=0.1), "audio/wav"))
    vae_app.slider(key="vae_steps").set_value(2)
    vae_app.slider(key="vae_walk_seconds").set_value(1.0)
    vae_app.slider(key="vae_walk_griffin_lim_iters").set_value(2)
    vae_app.run()
    vae_app.button(key="vae_interpolate").click()
    vae_app.run()
    assert_clean(vae_app)
    assert not vae_app.error
    assert len(vae_app.get("audio")) == 1 and len(vae_app.image) == 1  # the walk, its mel strip
    assert "a.wav (t = 0) to b.wav (t = 1), 1.0 s each" in " ".join(c.value for c in vae_app.caption)


@pytest.mark.parametrize("content, steps, words", [(b"this is not audio\n" * 50, 2, "does not decode"),
                                                   (tone_wav(amplitude=0.0), 2, "silent"),
                                                   (tone_wav(5.0), 16, "exceeds 30 s")])
def test_vae_interpolate_refuses_bad_uploads_with_one_message(vae_app, content, steps, words):
    vae_app.file_uploader(key="vae_a").set_value(("a.wav", tone_wav(5.0), "audio/wav"))
    vae_app.file_uploader(key="vae_b").set_value(("b.wav", content, "audio/wav"))
    vae_app.slider(key="vae_steps").set_value(steps)
    vae_app.slider(key="vae_walk_seconds").set_value(5.0)
    vae_app.run()
    vae_app.button(key="vae_interpolate").click()
    vae_app.run()
    assert_clean(vae_app)
    assert len(vae_app.error) == 1 and words in vae_app.error[0].value
    assert not vae_app.get("audio")


# ----------------------------------------------------------------------------
# A real browser on `streamlit run webapp.py`
# ----------------------------------------------------------------------------
def browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "no chromium and chromedriver here (apt-get install -y chromium chromium-driver)"
    if os.environ.get("IAG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"IAG_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def streamlit_url(tiny_vae):
    browser_or_skip()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IAG_VAE_CHECKPOINT": str(tiny_vae)}
    process = subprocess.Popen([sys.executable, "-m", "streamlit", "run", SCRIPT, "--server.address", "127.0.0.1",
                                "--server.port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("streamlit did not come up within 60 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser(streamlit_url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,2000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)  # the last one: no host but loopback resolves, so the page must be offline
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(120)
    try:
        yield chrome
    finally:
        chrome.quit()


def wait_for(chrome, css: str, count: int = 1, timeout: float = 180):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, timeout).until(
        lambda d: (found := d.find_elements(By.CSS_SELECTOR, css)) and len(found) >= count and found)


def wait_for_script(chrome, script: str, *args, timeout: float = 60):
    """Poll a JavaScript predicate: an <img> is in the page before its bytes have arrived and decoded."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, timeout).until(lambda d: d.execute_script(script, *args))


def click_text(chrome, tag: str, text: str) -> None:
    """Click the element showing `text`; an element that Streamlit re-renders under us (stale) is looked up again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def click(d) -> bool:
        element = next((e for e in d.find_elements(By.CSS_SELECTOR, tag) if e.text.strip() == text), None)
        if element is None:
            return False
        d.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", element)
        return True

    WebDriverWait(chrome, 180, ignored_exceptions=(StaleElementReferenceException,)).until(click)


def test_browser_generates_a_digit_and_reconstructs_a_wav(browser, streamlit_url, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(streamlit_url)
    click_text(browser, "[data-testid='stForm'] button", "Generate")
    images = wait_for(browser, "[data-testid='stImage'] img", count=2)
    settled = wait_for_script(browser, "return arguments[0].every(image => image.complete)", images)
    assert settled and all(image.get_property("naturalWidth") > 0 for image in images)  # decoded, not broken

    click_text(browser, "[data-testid='stTab']", "Audio")
    clip = tmp_path / "tone.wav"
    clip.write_bytes(tone_wav(1.0))
    wait_for(browser, "input[type='file']")[0].send_keys(str(clip))
    click_text(browser, "button", "Reconstruct")
    players = wait_for(browser, "audio", count=2)
    reconstruction = httpx.get(players[-1].get_attribute("src"), timeout=30)
    wav, rate = sf.read(io.BytesIO(reconstruction.content))
    assert rate == 16_000 and len(wav) == 16_000
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(("http://127.0.0.1", "blob:", "data:")) for name in loaded), loaded
    browser.save_screenshot(os.environ.get("IAG_SCREENSHOT", str(tmp_path / "webapp.png")))


def test_browser_samples_clips_from_the_vae(browser, streamlit_url):
    from selenium.webdriver.common.by import By

    browser.get(streamlit_url)
    click_text(browser, "[data-testid='stTab']", "Audio VAE")
    click_text(browser, "[data-testid='stForm'] button", "Sample")
    players = wait_for(browser, "audio", count=4)  # the default: four clips of 5 s
    clip = httpx.get(players[0].get_attribute("src"), timeout=30)
    wav, rate = sf.read(io.BytesIO(clip.content))
    assert rate == 16_000 and len(wav) == 5 * 16_000
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")


def test_browser_renders_the_api_docs_offline(browser):
    """/docs is Swagger UI from fastapi-offline's files: every operation shows with no host but loopback."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "api.py"), "--port", str(port)], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert server.poll() is None
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        browser.get(f"{url}/docs")
        operations = wait_for(browser, ".opblock", count=5)
        assert any("/v1/images/generate" in operation.text for operation in operations)
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(name.startswith(url) for name in loaded), loaded
    finally:
        server.terminate()
        server.wait(timeout=30)
