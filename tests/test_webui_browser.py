"""The web UI in a real browser (headless Chromium from the system's packages, driven by Selenium), as a user
clicks through it: load a YAML, preview the data, plan, launch 2 ranks, watch the loss chart grow, stop (a
preemption checkpoint), resume, stop the server (the run goes on) and follow the run to its end from a new one,
chat with the result (the answer `lf-dist chat` gives, greedy), export; then `lf-dist webchat`. Each page's
screenshot is saved under the test's temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lf_dist.ports import free_port
from lf_dist.train.checkpoint import is_preemption, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
MESSAGE = "Write the word in capital letters. stone"
STEPS = 24


def _browser():
    chromium = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser: `make browser` installs Debian's chromium and chromium-driver, not here")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def _serve(args: list[str], log: Path, env: dict | None = None):
    """`lf-dist <args> --port P` from the repository root, until its page answers; its stderr in `log`."""
    port = free_port()
    with open(log, "w", encoding="utf-8") as err:  # the server writes to its own copy of the file
        proc = subprocess.Popen(
            [sys.executable, "-m", "lf_dist", *args, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return proc, url
        except OSError:
            assert proc.poll() is None, log.read_text(encoding="utf-8")
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"lf-dist {args[0]} did not answer on {url}")


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait(driver, check, timeout: float, what: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)  # a page still loading or redrawing
    wait = WebDriverWait(driver, timeout, poll_frequency=0.25, ignored_exceptions=ignored)
    return wait.until(lambda d: check(d), message=what)


def _by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def _type(driver, name: str, value) -> None:
    field = _by_id(driver, name)
    field.clear()
    field.send_keys(str(value))
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def _text(driver, name: str) -> str:
    return _by_id(driver, name).text


def _points(driver) -> int:
    return int(_by_id(driver, "loss-chart").get_attribute("data-points"))


def _chat_cli(out: Path, tmp_path: Path) -> str:
    """`lf-dist chat`'s greedy answer to MESSAGE with the run's adapter."""
    infer = tmp_path / "infer.yaml"
    infer.write_text(
        f"model_name_or_path: examples/tiny/model\nadapter_name_or_path: {out}\ntemplate: chatml\n"
        "trust_remote_code: true\ndo_sample: false\nmax_new_tokens: 24\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "lf_dist", "chat", str(infer)],
        cwd=ROOT,
        input=f"{MESSAGE}\nexit\n",
        capture_output=True,
        encoding="utf-8",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split("Assistant: ", 1)[1].split("\nUser: ", 1)[0].strip()


def _ask(driver, text: str) -> str:
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    _type(driver, "chat-input", text)
    _by_id(driver, "chat-send").click()
    done = ".msg.assistant[data-done='true']"
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) > before, 120, "a streamed answer")
    assert not _text(driver, "chat-error")
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant span")[-1].text.strip()


def _train_page(driver, url: str, out: Path, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, lambda d: d.find_elements(By.ID, "t-model_name_or_path"), 60, "the form")
    _type(driver, "load-path", ROOT / "examples/tiny/sft_lora.yaml")
    _by_id(driver, "load-btn").click()
    _wait(driver, lambda d: d.find_elements(By.ID, "ds-alpaca_demo"), 30, "the YAML's datasets in the form")
    assert _by_id(driver, "t-model_name_or_path").get_attribute("value") == "examples/tiny/model"
    assert _by_id(driver, "ds-alpaca_demo").is_selected() and _by_id(driver, "ds-sharegpt_demo").is_selected()
    for name, value in (("output_dir", out), ("max_steps", STEPS), ("logging_steps", 1), ("ranks", 2)):
        _type(driver, f"t-{name}", value)
    _by_id(driver, "preview-btn").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".preview-rec"), 120, "the data preview")
    assert "<|im_start|>assistant" in driver.find_element(By.CSS_SELECTOR, ".preview-rec").text
    assert not _by_id(driver, "launch-btn").is_enabled()  # not before the plan
    _by_id(driver, "plan-btn").click()
    _wait(driver, lambda d: _text(d, "plan").startswith("plan:"), 120, "the plan")
    plan = _text(driver, "plan")
    assert "torchrun ×2" in plan and "fits" in plan and "memory per device (GiB)" in plan and "most that fits" in plan
    assert f"max_steps: {STEPS}" in _text(driver, "yaml")
    driver.execute_script("document.getElementById('plan').scrollIntoView()")
    driver.save_screenshot(str(shots / "train.png"))
    _by_id(driver, "launch-btn").click()


def _watch_stop_resume(driver, out: Path, shots: Path) -> None:
    _wait(driver, lambda d: _points(d) >= 3, 300, "the loss chart's first points")
    assert _text(driver, "run-state") == "running" and "tokens/s" in _text(driver, "run-tps")
    _by_id(driver, "stop-btn").click()
    _wait(driver, lambda d: _text(d, "run-state") == "preempted", 120, "the preempted state")
    checkpoints = list_checkpoints(out)
    assert checkpoints and is_preemption(checkpoints[-1]) and checkpoints[-1].name in _text(driver, "run-ckpt")
    assert "preempted" in _text(driver, "run-lines") and 3 <= _points(driver) < STEPS
    driver.save_screenshot(str(shots / "runs-preempted.png"))
    _by_id(driver, "resume-btn").click()
    _wait(driver, lambda d: _text(d, "run-state") == "running", 60, "the resumed run")


def _reopen_until_finished(driver, url: str, out: Path, shots: Path) -> None:
    """A new page on a new server: the run, which went on without either, in the runs list and its view."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, lambda d: d.find_elements(By.ID, "t-model_name_or_path"), 60, "the page")
    driver.execute_script("document.querySelector(\"#tabs button[data-page='runs']\").click()")
    row = f"//tr[td[1][text()='{out}']]//button"
    _wait(driver, lambda d: d.find_elements(By.XPATH, row), 30, "the run in the runs list")
    driver.find_element(By.XPATH, row).click()
    _wait(driver, lambda d: _text(d, "run-state") == "finished", 300, "the resumed run to finish")
    _wait(driver, lambda d: _points(d) == STEPS, 10, "every logged step on the chart")
    assert _text(driver, "run-step") == f"step {STEPS} / {STEPS}"
    assert "peak memory" in _text(driver, "run-mem") and "planned" in _text(driver, "run-mem")
    driver.save_screenshot(str(shots / "runs-finished.png"))


def _chat_and_export(driver, out: Path, shots: Path) -> str:
    _by_id(driver, "chat-run-btn").click()
    _wait(driver, lambda d: _by_id(d, "c-adapter_name_or_path").get_attribute("value") == str(out), 30, "the run")
    _by_id(driver, "g-do_sample").click()  # greedy
    _type(driver, "g-max_new_tokens", 24)
    _by_id(driver, "chat-load-btn").click()
    _wait(driver, lambda d: _text(d, "chat-model").startswith("loaded"), 120, "the model")
    answer = _ask(driver, MESSAGE)
    driver.save_screenshot(str(shots / "chat.png"))
    _by_id(driver, "chat-clear").click()
    assert not _text(driver, "chat-log")
    driver.execute_script("document.querySelector(\"#tabs button[data-page='export']\").click()")
    merged = out.parent / "merged"
    for name, value in (("model_name_or_path", "examples/tiny/model"), ("adapter_name_or_path", out)):
        _type(driver, f"e-{name}", value)
    _type(driver, "e-template", "chatml")
    _type(driver, "e-export_dir", merged)
    _by_id(driver, "e-trust_remote_code").click()
    _by_id(driver, "export-btn").click()
    _wait(
        driver, lambda d: _text(d, "export-result").startswith("exported") or _text(d, "export-error"), 300, "export"
    )
    assert not _text(driver, "export-error")
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    driver.save_screenshot(str(shots / "export.png"))
    return answer


def test_a_user_plans_launches_watches_stops_resumes_chats_and_exports_in_a_browser(tmp_path):
    driver = _browser()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    out = tmp_path / "runs" / "sft"
    args, env = ["webui", "--runs", str(tmp_path / "runs")], {"LF_DIST_STEP_SECONDS": "0.4"}
    server, url = _serve(args, tmp_path / "webui.log", env)
    try:
        _train_page(driver, url, out, shots)
        _watch_stop_resume(driver, out, shots)
    finally:
        _stop(server)  # the page's server goes while the resumed run trains: the run does not
    server, url = _serve(args, tmp_path / "webui-again.log", env)
    try:
        _reopen_until_finished(driver, url, out, shots)
        answer = _chat_and_export(driver, out, shots)
    finally:
        _stop(server)
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["current_steps"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    expected = _chat_cli(out, tmp_path)
    assert answer == expected and answer

    webchat, url = _serve(["webchat", str(tmp_path / "infer.yaml")], tmp_path / "webchat.log")
    try:
        driver.get(url)
        _wait(driver, lambda d: not _by_id(d, "g-do_sample").is_selected(), 60, "the config's generation keys")
        assert [b.text for b in driver.find_elements("css selector", "#tabs button") if b.is_displayed()] == ["Chat"]
        assert _ask(driver, MESSAGE) == expected
        driver.save_screenshot(str(shots / "webchat.png"))
    finally:
        _stop(webchat)
        driver.quit()
    assert sorted(p.name for p in shots.iterdir()) == [
        "chat.png",
        "export.png",
        "runs-finished.png",
        "runs-preempted.png",
        "train.png",
        "webchat.png",
    ]
