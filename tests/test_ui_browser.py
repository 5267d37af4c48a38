"""/ui in a real headless Chromium (Selenium): upload images and see their verdicts on the histogram,
hostile files refused with the server's own message, the gallery paged and filtered, the API key asked for.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser``, run by ``make test``); skipped,
saying so, only when no browser or driver can be found.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from serving import digit_like, png_bytes
from test_api import BAD_INPUTS, KEYS, limits_env
from test_images import HOSTILE
from ui_assets import N_KEPT, N_REJECTED, REJECT_REASON, serving_in_thread

from oodforge.detector import Detector

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')"
)
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")


def find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def headless_chromium() -> webdriver.Chrome:
    binary, driver = find(BROWSERS), find(DRIVERS)
    if binary is None or driver is None:
        pytest.skip(
            "no headless browser: install Debian's chromium and chromium-driver (make browser, as root) "
            f"to run the /ui browser tests (found browser: {binary}, driver: {driver})"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    try:
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    except WebDriverException as err:
        pytest.skip(f"chromium at {binary} with {driver} does not start: {err.msg}")


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(ui_assets):
    with serving_in_thread(limits_env(ui_assets.detectors)) as running:
        yield running


def wait_for(browser, condition, what: str, timeout: float = 10):
    try:
        return WebDriverWait(browser, timeout).until(lambda _: condition())
    except TimeoutException:
        pytest.fail(
            f"{what} did not appear in {timeout} s; page text:\n{browser.find_element(By.TAG_NAME, 'body').text}"
        )


def results(browser) -> list:
    return browser.find_elements(By.CSS_SELECTOR, "#results li.result")


def settled(browser, n: int) -> list:
    """The ``n`` result entries once none is still being scored."""
    wait_for(
        browser,
        lambda: (
            len(results(browser)) == n and not browser.find_elements(By.CSS_SELECTOR, "#results li.pending")
        ),
        f"{n} scored results",
    )
    return results(browser)


def open_detector(browser, server, name: str) -> None:
    browser.get(f"{server.url}/ui?detector={name}")
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#card dd[data-field=kind]"), "the card")


def test_an_uploaded_image_gets_its_verdict_on_the_histogram(browser, server, ui_assets, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(digit_like(0)))
    expected = Detector.load(ui_assets.detectors / "tiny" / "detector").predict([image])
    open_detector(browser, server, "tiny")
    card = browser.find_element(By.ID, "card").text
    assert (
        "classifier" in card and "0, 1, 2" in card and "energy" in card and "val split, 60 ID images" in card
    )
    assert "AUROC" in card and "noise" in card and str(ui_assets.outliers) in card
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bin")) == 40
    assert browser.find_elements(By.ID, "threshold-line")
    browser.find_element(By.ID, "files").send_keys(str(image))
    (entry,) = settled(browser, 1)
    verdict = "OOD" if expected.is_ood[0] else "ID"
    assert entry.find_element(By.CSS_SELECTOR, ".badge").text == verdict
    assert f"label {expected.label_names()[0]}" in entry.text
    score = float(entry.find_element(By.CSS_SELECTOR, ".score").text.split()[1])
    assert score == pytest.approx(float(expected.scores[0]), rel=1e-3)
    (mark,) = browser.find_elements(By.CSS_SELECTOR, "#histogram g.mark")
    assert verdict in mark.find_element(By.TAG_NAME, "title").get_attribute("textContent")


def test_an_old_artifact_says_it_has_no_histogram_and_still_scores(browser, server, tmp_path):
    image = tmp_path / "other.png"
    image.write_bytes(png_bytes(digit_like(3)))
    open_detector(browser, server, "old")
    assert "no histogram in this artifact" in browser.find_element(By.ID, "histogram-note").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bin")
    browser.find_element(By.ID, "files").send_keys(str(image))
    (entry,) = settled(browser, 1)
    assert entry.find_element(By.CSS_SELECTOR, ".badge").text in ("ID", "OOD")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram g.mark")) == 1


def hostile_files(tmp_path: Path) -> dict[str, bytes]:
    """Every case of the two matrices that a file picker can send: one file in the field 'files'."""
    files = {}
    for _, (request, _, _) in BAD_INPUTS.items():
        parts = request.get("files")
        if set(request) == {"files"} and len(parts) == 1 and parts[0][0] == "files":
            name, data, _ = parts[0][1]
            files[name] = data
    files |= {f"{name.replace(' ', '-')}.bin": data for name, (data, _, _) in HOSTILE.items()}
    return files


def test_hostile_files_show_the_servers_own_error_on_the_page(browser, server, tmp_path):
    files = hostile_files(tmp_path)
    assert (
        len(files) >= 14
    )  # not an image, empty, truncated, corrupt, animated, too many pixels, too large...
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        direct = {
            name: client.post("/score", params={"detector": "tiny"}, files={"files": (name, data)})
            for name, data in files.items()
        }
    open_detector(browser, server, "tiny")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(tmp_path / name) for name in files))
    shown = {e.find_element(By.CSS_SELECTOR, ".name").text: e for e in settled(browser, len(files))}
    assert sorted(shown) == sorted(files)
    for name, response in direct.items():
        assert 400 <= response.status_code < 500, (name, response.text)
        error = shown[name].find_element(By.CSS_SELECTOR, ".error").text
        assert error == f"refused (HTTP {response.status_code}): {response.json()['detail']}", name
    assert not browser.find_elements(By.CSS_SELECTOR, "#histogram g.mark")  # nothing was scored


def tiles(browser) -> list:
    return browser.find_elements(By.CSS_SELECTOR, "#grid .tile")


def test_the_gallery_pages_and_filters(browser, server, ui_assets):
    browser.get(f"{server.url}/ui/outliers?dir={ui_assets.outliers}&per_page=12")
    info = browser.find_element(By.ID, "page-info")
    wait_for(browser, lambda: info.text == f"page 1 of 4 · {N_KEPT + N_REJECTED} records", "page 1 of 4")
    assert [t.get_attribute("data-id") for t in tiles(browser)] == [f"px-{i:04d}" for i in range(12)]
    wait_for(
        browser,
        lambda: (
            all(
                browser.execute_script("return arguments[0].naturalWidth", img) == 16
                for img in browser.find_elements(By.CSS_SELECTOR, "#grid .tile img")
            )
            and len(browser.find_elements(By.CSS_SELECTOR, "#grid .tile img")) == 12
        ),
        "12 images",
    )
    browser.find_element(By.ID, "next").click()
    wait_for(browser, lambda: info.text.startswith("page 2 of 4"), "page 2")
    assert tiles(browser)[0].get_attribute("data-id") == "px-0012"
    Select(browser.find_element(By.ID, "kept")).select_by_value("rejected")
    wait_for(browser, lambda: info.text == f"page 1 of 1 · {N_REJECTED} records", "the rejected ones")
    rejected = tiles(browser)
    assert len(rejected) == N_REJECTED and all(t.get_attribute("data-kept") == "false" for t in rejected)
    assert all(REJECT_REASON in t.text and "no image" in t.text for t in rejected)
    assert not browser.find_elements(By.CSS_SELECTOR, "#grid img")
    Select(browser.find_element(By.ID, "source-class")).select_by_value("1")
    wait_for(
        browser, lambda: info.text == "page 1 of 1 · 3 records", "class 1 of the rejected ones"
    )  # 31, 34, 37
    assert {t.get_attribute("data-class") for t in tiles(browser)} == {"1"}
    assert "kept=rejected" in browser.current_url and "source_class=1" in browser.current_url


def test_the_page_asks_for_the_api_key_and_then_scores(browser, ui_assets, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(digit_like(5)))
    env = limits_env(ui_assets.detectors) | {"OODFORGE_API_KEYS": ",".join(KEYS)}
    with serving_in_thread(env) as secured:
        browser.get(f"{secured.url}/ui")
        message = browser.find_element(By.ID, "auth-message")
        wait_for(browser, lambda: "needs an API key" in message.text, "the key prompt")
        assert not browser.find_elements(By.CSS_SELECTOR, "#card dd")
        browser.find_element(By.ID, "auth-key").send_keys(KEYS[1] + "\n")
        wait_for(
            browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#card dd[data-field=kind]"), "the card"
        )
        browser.find_element(By.ID, "files").send_keys(str(image))
        (entry,) = settled(browser, 1)
        assert entry.find_element(By.CSS_SELECTOR, ".badge").text in ("ID", "OOD")
        browser.execute_script("sessionStorage.clear()")
