"""`nnperf report`: one self-contained HTML file, escaped, and it renders in a real browser."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from nnperf.analysis.report import write_report

from conftest import TINY
from test_analysis import make_run


NASTY = "b<img src=x onerror=window.alert_called=1>"  # a run name that would run code if not escaped


def _two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, NASTY)
    (a / "config.yaml").write_text("model: fast\nlr: 0.1\nnote: '<b>bold</b> & more'\n")
    (b / "config.yaml").write_text("model: fast\nlr: 0.2\n")
    (a / "env.json").write_text('{"device_name": "Test GPU", "precision": "bf16"}')
    (a / "test.json").write_text('{"test": {"split": "test", "top1": 0.6512, "top5": 0.9, "loss": 1.1}}')
    return a, b


def test_report_is_self_contained_escaped_and_has_every_section(tmp_path):
    a, b = _two_runs(tmp_path)
    page = write_report([str(a), str(b)], tmp_path / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=window.alert_called=1&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    assert page.count("data:image/png;base64,") >= 2 * 8  # curves + telemetry of both runs, + overlay
    for text in ("Side by side", "Config keys that differ: lr, note", "Run: a", "FINAL top-1", "TEST top-1 (test)",
                 "0.6512", "Energy per epoch", "Telemetry", "Configuration", "Environment", "Test GPU"):
        assert text in page, text


def test_train_report_flag_writes_the_report_and_plots(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "r", "--report")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"report: {Path('runs') / 'r' / 'report.html'}"
    assert (tmp_path / "runs" / "r" / "plots" / "curve_top1.png").exists()
    assert "FINAL top1" in (tmp_path / "runs" / "r" / "report.html").read_text()


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium and chromedriver are not installed "
                                                "(Debian: apt-get install chromium chromium-driver)")
def test_report_loads_in_headless_chromium_without_errors(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install .[test])")
    a, b = _two_runs(tmp_path)
    page = write_report([str(a), str(b)], tmp_path / "report.html")
    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page.resolve().as_uri())
        assert driver.title == f"nnperf report: a, {NASTY}"
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert headings[0] == "Side by side" and "Run: a" in headings
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(driver.execute_script("return arguments[0].naturalWidth", im) > 0 for im in images)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        assert driver.execute_script("return typeof alert_called") == "undefined"
    finally:
        driver.quit()


def test_report_from_loose_files_uses_all_of_them(tmp_path):
    a = make_run(tmp_path, "a")
    page = write_report([str(a / "telemetry" / "train_epoch.jsonl"), str(a / "metrics.jsonl")],
                        tmp_path / "r.html").read_text()
    assert "No metrics.jsonl" not in page and "FINAL top-1" in page
    assert page.count("data:image/png;base64,") >= 4 + 3  # curves + the telemetry metrics of the file
