"""The annotation page in a real browser: headless Chromium (Debian's chromium + chromium-driver) opens an
annotator's page from disk, labels every pair by click and by key, is reloaded mid-way, downloads the labels,
and `collect` makes Table 3 from them. `pytest -m browser tests/test_humaneval_page.py`.

With RRHF_PAGE_SCREENSHOT=docs/humaneval-page.png the test also writes the laptop- and phone-width screenshots,
side by side, to that file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from rrhf.humaneval import build_sheets, collect, write_pages, write_sheets

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")


def comparisons() -> list[tuple]:
    out = []
    for c, (name, evaluated, versus) in enumerate(
        [("rrhf_dp-vs-good_responses", "rrhf_dp", "dataset_chosen"), ("rrhf_dp-vs-ppo", "rrhf_dp", "ppo")]
    ):
        pairs = []
        for i in range(8):
            prompt = (
                "\n\nHuman: How can I make my clothes whiter?\n\nAssistant: You can use vinegar.\n\nHuman: "
                f"Is <b>bleach</b> & vinegar safe together{'?' * (1 + (c * 8 + i) % 3)}\n\nAssistant:"
            )
            # The evaluated system's reply starts "No.", the other's "Yes,": the test labels by content.
            mine = "No. Never mix bleach with vinegar or ammonia: together they release a toxic gas."
            theirs = "Yes, mixing them makes a stronger cleaner."
            pairs.append(
                (
                    prompt,
                    mine,
                    theirs,
                    {"run_key": evaluated, "artifact": f"a/{evaluated}.jsonl"},
                    {"run_key": versus, "artifact": f"a/{versus}.jsonl"},
                )
            )
        out.append((name, evaluated, versus, pairs))
    return out


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium is not installed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager would otherwise look for a browser build on the network; the Debian ones are given.
    monkeypatch.setenv("SE_OFFLINE", "true")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,860",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
        },
    )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


def _state(driver) -> dict:
    item = driver.find_element("id", "item")
    progress = driver.find_element("id", "progress")
    return {
        "index": int(item.get_attribute("data-index")),
        "item": item.get_attribute("data-item-id"),
        "label": item.get_attribute("data-label"),
        "labelled": int(progress.get_attribute("data-labelled")),
        "total": int(progress.get_attribute("data-total")),
        "text": progress.text,
    }


def _wait_for_file(folder: Path, seconds: float = 10.0) -> Path:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done = [p for p in folder.iterdir() if p.suffix == ".json"]
        if done and not list(folder.glob("*.crdownload")):
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no download in {folder}: {list(folder.iterdir())}")


def _screenshots(driver, folder: Path) -> Path:
    """Laptop width, then phone width (375 px, stacked responses), side by side in one image."""
    from PIL import Image

    shots = []
    for name, width, height, mobile in (("laptop", 1280, 860, False), ("phone", 375, 812, True)):
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )
        a = driver.find_element("id", "response-a").rect
        b = driver.find_element("id", "response-b").rect
        if mobile:
            assert b["y"] >= a["y"] + a["height"] - 1 and b["x"] == a["x"], (a, b)  # stacked
        else:
            assert b["y"] == a["y"] and b["x"] > a["x"] + a["width"] - 1, (a, b)  # side by side
        shots.append(folder / f"{name}.png")
        driver.save_screenshot(str(shots[-1]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    images = [Image.open(p) for p in shots]
    gap = 24
    combined = Image.new("RGB", (sum(i.width for i in images) + gap, max(i.height for i in images)), "#888888")
    combined.paste(images[0], (0, 0))
    combined.paste(images[1], (images[0].width + gap, 0))
    out = folder / "humaneval-page.png"
    combined.save(out, optimize=True)
    return out


def test_label_reload_download_and_collect(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver, downloads = browser
    sheets = build_sheets(comparisons(), seed=4, pairs_per_comparison=8, shared=4, annotators=2)
    write_sheets(sheets, tmp_path / "he")
    pages = write_pages(sheets, tmp_path / "he")
    name = "annotator-1"
    n = len(sheets.annotator_sheets[name]["items"])
    driver.get(pages[name].resolve().as_uri())

    state = _state(driver)
    assert (state["index"], state["labelled"], state["total"]) == (0, 0, n) and state["text"] == f"0 of {n} labelled"
    conversation = driver.find_element("id", "conversation")
    turns = conversation.find_elements("css selector", ".turn")
    assert [t.find_element("css selector", ".speaker").text for t in turns] == ["HUMAN", "ASSISTANT", "HUMAN"]
    assert "Is <b>bleach</b> & vinegar safe together?" in turns[2].text  # shown as text, not markup
    assert not conversation.find_elements("css selector", "b")
    assert driver.find_element("id", "sheet-id").text == sheets.sheet_id

    def press(key: str) -> None:
        ActionChains(driver).send_keys(key).perform()

    def answer(i: int) -> str:
        """Prefer the evaluated system's response; item 2 is a tie. Alternate clicks, digits and letters."""
        a_text = driver.find_element("css selector", "#response-a .text").text
        want = "tie" if i == 2 else ("A" if a_text.startswith("No.") else "B")
        how = i % 3
        if how == 0:
            driver.find_element("id", f"label-{want}").click()
        elif how == 1:
            press({"A": "1", "tie": "2", "B": "3"}[want])
        else:
            press({"A": "a", "tie": "t", "B": "b"}[want])
        return want

    given: dict[str, str] = {}
    half = n // 2
    for i in range(half):
        before = _state(driver)
        given[before["item"]] = answer(i)
        after = _state(driver)
        assert after["labelled"] == i + 1 and after["index"] == min(i + 1, n - 1)
    # Arrow keys move between items without labelling.
    press(Keys.ARROW_LEFT)
    assert _state(driver)["index"] == half - 1 and _state(driver)["label"] == given[_state(driver)["item"]]
    press(Keys.ARROW_RIGHT)
    assert _state(driver)["index"] == half

    driver.refresh()  # the tab closed and opened again: the labels and the place are kept
    state = _state(driver)
    assert (state["index"], state["labelled"]) == (half, half) and state["text"] == f"{half} of {n} labelled"
    assert (
        driver.find_element("css selector", f'#overview button[data-index="{half - 1}"]').get_attribute("data-label")
        == given[sheets.annotator_sheets[name]["items"][half - 1]["id"]]
    )

    # Half-way, as an annotator sees it: the next pair to judge, the first half marked done.
    shot = _screenshots(driver, tmp_path)
    if os.environ.get("RRHF_PAGE_SCREENSHOT"):
        target = Path(os.environ["RRHF_PAGE_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    for i in range(half, n):
        current = _state(driver)["item"]
        given[current] = answer(i)
    state = _state(driver)
    assert state["labelled"] == n and state["text"] == f"{n} of {n} labelled"
    assert driver.find_element("id", "status").text.startswith("All labelled")

    driver.find_element("id", "download").click()
    downloaded = _wait_for_file(downloads)
    data = json.loads(downloaded.read_text())
    assert set(data) == {"sheet_id", "annotator", "labels"}
    assert (data["sheet_id"], data["annotator"], data["labels"]) == (sheets.sheet_id, name, given)

    # The other annotator prefers the evaluated system throughout; collect makes the table from both files.
    other = {
        it["id"]: ("A" if it["response_a"].startswith("No.") else "B")
        for it in sheets.annotator_sheets["annotator-2"]["items"]
    }
    other_file = tmp_path / "labels-annotator-2.json"
    other_file.write_text(json.dumps({"sheet_id": sheets.sheet_id, "annotator": "annotator-2", "labels": other}))
    table = collect(tmp_path / "he" / "key.json", [downloaded, other_file], tmp_path / "tables")
    items = sheets.key["items"]
    tie_item = sheets.annotator_sheets[name]["items"][2]["id"]
    for row in table.rows:
        scored = [i for i, v in items.items() if v["comparison"] == row.comparison and not v["shared"]]
        ties = int(tie_item in scored)
        assert row.counts == {"win": len(scored) - ties, "tie": ties, "lose": 0}
    assert table.agreement.items == 4 and table.agreement.annotator_pairs == 4
    assert table.agreement.same == 4 - int(items[tie_item]["shared"])
    assert "Judged by human annotators" in (tmp_path / "tables" / "table3.tex").read_text()
