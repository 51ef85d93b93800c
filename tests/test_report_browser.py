"""Render the dashboard in Debian's headless Chromium, driven by Playwright.

Needs `pip install playwright` (its driver ships in the wheel; no `playwright install`) and
`apt-get install -y chromium`. Skipped only when /usr/bin/chromium is missing.
"""

import re
from pathlib import Path

import pytest
from matplotlib.image import imread
from playwright.sync_api import sync_playwright

from conformer_prune.report import write_report
from test_report import write_fake_runs

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home, which this closed
# network refuses, and those failures would muddle the console.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIGURES = 5  # test-clean and test-other trade-offs, one gated run's gates and retention
# histogram, training curves

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install -y chromium")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """The fake runs' dashboard open in Chromium, with what the page logged and requested."""
    root = tmp_path_factory.mktemp("runs")
    write_fake_runs(root)
    index = write_report([root], tmp_path_factory.mktemp("report"))
    errors, requests = [], []
    with sync_playwright() as playwright:
        # A persistent context is how Playwright takes a --user-data-dir: a fresh one here.
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("profile"), executable_path=str(CHROMIUM), headless=True,
            args=FLAGS, viewport={"width": 1400, "height": 900})
        # The page must work offline: note and refuse anything that leaves the file.
        context.route(re.compile(r"^(?!file:|data:|blob:)"),
                      lambda route: (requests.append(route.request.url), route.abort()))
        page = context.new_page()
        page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(index.as_uri(), wait_until="load")
        page.wait_for_function(
            "n => document.querySelectorAll('.js-plotly-plot .main-svg').length >= n",
            arg=FIGURES, timeout=30_000)
        yield {"page": page, "errors": errors, "requests": requests,
               "shots": tmp_path_factory.mktemp("shots")}
        context.close()


def test_loads_without_console_errors_or_requests(dashboard):
    assert dashboard["page"].title() == "conformer-prune report"
    assert dashboard["errors"] == []
    assert dashboard["requests"] == []


def test_plotly_figures_render(dashboard):
    page = dashboard["page"]
    rendered = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(plot => plot.querySelector('svg.main-svg')).length""")
    assert rendered == FIGURES
    assert page.locator(".js-plotly-plot .scatterlayer .point").count() >= 6
    # the gate heatmap and the retention histogram
    assert page.locator(".js-plotly-plot .hm image").count() == 2
    assert page.locator(".js-plotly-plot .slider-container").count() == 1  # its epoch slider


def test_axis_buttons_switch_the_x_quantity(dashboard):
    page = dashboard["page"]
    plot = page.locator(".js-plotly-plot").first
    assert plot.locator(".xtitle").text_content() == "Parameters (total)"
    plot.locator(".updatemenu-button", has_text="Encoder FLOPs per audio second").click()
    page.wait_for_timeout(300)
    assert plot.locator(".xtitle").text_content() == "Encoder FLOPs per audio second"


def test_gate_slider_shows_an_earlier_epoch(dashboard):
    page = dashboard["page"]
    heatmap = page.locator(".js-plotly-plot", has=page.locator(".slider-container"))
    assert "218/256" in heatmap.locator(".hm").text_content()  # layer 0 ffn1, last epoch
    heatmap.scroll_into_view_if_needed()  # the mouse clicks where the viewport shows
    rail = heatmap.locator(".slider-rail-touch-rect").bounding_box()
    page.mouse.click(rail["x"] + 2, rail["y"] + rail["height"] / 2)  # the first epoch
    page.wait_for_timeout(300)
    assert "244/256" in heatmap.locator(".hm").text_content()
    assert "epoch 1" in heatmap.locator(".slider-container").text_content()


def test_table_sorts_on_header_click(dashboard):
    page = dashboard["page"]

    def names():
        return page.locator("table.sortable tbody tr td:first-child").all_text_contents()

    header = page.locator("table.sortable th", has_text="wer_test-clean")
    header.click()
    assert names() == ["conformer_dense", "conformer_adrop", "conformer_adrop_shrunk",
                       "old_run"]
    header.click()
    assert names()[0] == "old_run"


def test_screenshot(dashboard):
    path = dashboard["shots"] / "dashboard.png"
    dashboard["page"].screenshot(path=str(path), full_page=True)
    image = imread(path)
    assert image.shape[0] > 2000 and image.shape[1] >= 1400  # the whole page, all views
    assert image[..., :3].std() > 0.1  # not a blank page
