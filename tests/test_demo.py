"""The demo (visalign.demo): its backend, its API through gradio_client, and the page driven by a
real headless browser (Debian chromium + selenium), launched as the docs say (`visalign demo`).

The backend tests run everywhere (the backend needs no Gradio); the app, API and browser tests
skip cleanly when gradio, gradio_client, selenium or chromium are absent (see
docs/personalisation.md for what to install).
"""

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from visalign.algorithms.ppd import add_user_branch, save_user_branch
from visalign.demo import DemoBackend, DemoConfig, Session, build_app
from visalign.models import load_generator
from visalign.personal import load_encoder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ppd_branch(tiny_model_dir, tmp_path_factory):
    generator = load_generator(tiny_model_dir("sd"))
    add_user_branch(generator, load_encoder("testbed").embed_dim)
    with torch.no_grad():
        for name, p in generator.denoiser.named_parameters():
            if "to_v_user" in name:
                p.normal_(0, 0.5)
    return save_user_branch(generator, tmp_path_factory.mktemp("ppd") / "branch.safetensors")


@pytest.fixture(scope="module")
def config(tiny_model_dir, ppd_branch):
    return DemoConfig(model=str(tiny_model_dir("sd")), ppd=str(ppd_branch), steps=2, num_images=2, particles=2,
                      display_size=96, port=free_port())


@pytest.fixture(scope="module")
def backend(config):
    return DemoBackend(config)


def test_backend_rounds_embedding_and_both_routes(backend):
    assert backend.routes == ("steer", "ppd") and len(backend.pairs) == 4
    session = Session()
    with pytest.raises(ValueError, match="choices first"):
        backend.generate(session, "a red circle", "steer", 1.0)
    for side in ("left", "right", "left", "left"):
        assert backend.pair_view(session)[2].startswith(f"Round {session.round + 1} of 4")
        session = backend.choose(session, side)
    assert session.user is not None and session.user.shape == (48,)
    assert backend.pair_view(session)[0] is None
    for route in ("steer", "ppd"):
        images = backend.generate(session, "a red circle", route, 0.7)
        assert len(images) == 2 and images[0].size == (96, 96)


def test_model_folders_that_do_not_load_give_clear_messages(tmp_path):
    from visalign.cli import main

    pytest.importorskip("gradio")  # without it `visalign demo` stops first, saying so

    result = CliRunner().invoke(main, ["demo", f"model={tmp_path / 'missing'}"])
    assert result.exit_code != 0 and "does not exist" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    result = CliRunner().invoke(main, ["demo", f"model={broken}"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert str(broken) in result.output
    result = CliRunner().invoke(main, ["demo", "rounds=3"])
    assert result.exit_code != 0 and "at least 4" in result.output


def test_demo_binds_localhost_by_default():
    assert DemoConfig().host == "127.0.0.1"


def test_gradio_client_api(backend):
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    app = build_app(backend)
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(app.local_url, verbose=False)
        left, right, status = client.predict(api_name="/pair")
        assert status.startswith("Round 1 of 4") and Path(left).is_file() and Path(right).is_file()
        for endpoint in ("/choose_left", "/choose_right", "/choose_left", "/choose_right"):
            *_, status = client.predict(api_name=endpoint)
        assert status.startswith("Done")
        gallery = client.predict("a blue square", "PPD (user-conditioned model)", 1.0, api_name="/generate")
        assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    finally:
        app.close()


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow  # 100-190 s here (2 shared cores under load): the server start and the round trips
def test_browser_clicks_four_choices_and_generates(config, tmp_path):
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    found = _chromium()
    if found is None:
        pytest.skip("Debian chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    script = Path(sys.executable).parent / "visalign"  # the console script, as the docs launch it
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "visalign.cli"]
    # VISALIGN_DEMO_MODEL/_PPD/_STEPS point the same test at the testbed model (the docs' screenshot)
    model = os.environ.get("VISALIGN_DEMO_MODEL", config.model)
    ppd = os.environ.get("VISALIGN_DEMO_PPD", config.ppd)
    steps = os.environ.get("VISALIGN_DEMO_STEPS", "2")
    command = [*launcher, "demo", f"model={model}", f"ppd={ppd}", f"steps={steps}",
               "num_images=4", "particles=2", "display_size=128", f"port={port}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000"):
        options.add_argument(flag)
    browser = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail(f"visalign demo exited: {server.stdout.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        browser = webdriver.Chrome(service=Service(found[1]), options=options)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 120)
        status = (By.ID, "round-status")
        for round_index, button in enumerate(("choose-left", "choose-right", "choose-left", "choose-left"), start=1):
            wait.until(expected_conditions.text_to_be_present_in_element(status, f"Round {round_index} of 4"))
            wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#left-image img").get_attribute("src"))
            browser.find_element(By.ID, button).click()
        wait.until(expected_conditions.text_to_be_present_in_element(status, "Done"))
        browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("two yellow triangles")
        browser.find_element(By.XPATH, "//*[@id='route']//label[contains(., 'PPD')]").click()
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 4)
        shot = Path(os.environ.get("VISALIGN_DEMO_SCREENSHOT", tmp_path / "demo.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
