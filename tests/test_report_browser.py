"""report.html in a real headless Chromium: it renders, its images load, and the console shows no errors.

A copy of the page gets a probe script that records JavaScript errors, failed resources and console.error calls,
and on `load` writes what it saw (images loaded, tables) into a `data-probe` attribute of <body>; Chromium's
--dump-dom then prints the DOM, probe included. A deliberately broken page proves the probe can fail.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from falconbench.report import write_report

DATA = Path(__file__).parent / "data"
RECORDED = DATA / "smollm2-cpu"
MATRIX = DATA / "smollm2-matrix"  # a recorded run matrix (schemes × prompt × batch) on SmolLM2, CPU
FINETUNE = DATA / "smollm2-finetune"  # a recorded `run --task finetune` (lora, qlora, full) on SmolLM2, CPU
BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium installed (apt-get install chromium)")

PROBE = """<script>
window.__problems = [];
window.addEventListener("error", (e) => {
  const where = e.target && e.target !== window ? (e.target.currentSrc || e.target.src || e.target.tagName) : "";
  window.__problems.push("error: " + (e.message || ("failed to load " + where.slice(0, 80))));
}, true);
const originalError = console.error;
console.error = (...args) => { window.__problems.push("console.error: " + args.join(" ")); originalError(...args); };
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.setAttribute("data-probe", JSON.stringify({
    images: images.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    loadedAlts: images.filter((i) => i.complete && i.naturalWidth > 0).map((i) => i.alt),
    tables: document.querySelectorAll("table").length,
    problems: window.__problems,
  }));
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def probe(page: Path, tmp_path: Path) -> tuple[dict, str]:
    """What the probe saw in `page`, and Chromium's stderr."""
    probed = page.with_name("probed-" + page.name)
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    done = chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, f"the probe did not run (rc {done.returncode}):\n{done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")), done.stderr


def console_errors(stderr: str) -> list[str]:
    """Chromium's own log lines for page console messages and failed loads (its D-Bus noise is not the page's)."""
    return [line for line in stderr.splitlines()
            if re.search(r"CONSOLE|Uncaught|Failed to load resource|net::ERR_", line)]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(RECORDED, folder)
    write_report([folder])
    return folder / "report.html"


def test_the_report_page_renders_with_every_image_and_no_console_error(report, tmp_path):
    seen, stderr = probe(report, tmp_path)
    assert seen["images"] == len(list(report.parent.glob("*.png"))) >= 3
    assert seen["loaded"] == seen["images"]
    assert seen["tables"] == report.read_text().count("<table>") >= 2
    assert seen["problems"] == []
    assert console_errors(stderr) == []


def test_a_matrix_report_shows_measured_points_over_the_planned_curve(tmp_path):
    from falconbench.render.report import PLOT_TITLES

    folder = tmp_path / "matrix"
    shutil.copytree(MATRIX, folder)
    write_report([folder])
    seen, stderr = probe(folder / "report.html", tmp_path)
    assert seen["loaded"] == seen["images"] == len(list(folder.glob("*.png")))
    assert PLOT_TITLES["matrix-memory.png"] in seen["loadedAlts"]
    assert PLOT_TITLES["scaling.png"] in seen["loadedAlts"]
    assert seen["problems"] == [] and console_errors(stderr) == []


@pytest.mark.parametrize("inference", [False, True], ids=["fine-tuning alone", "beside inference"])
def test_a_fine_tuning_report_shows_its_plot_with_the_others(tmp_path, inference):
    from falconbench.render.report import PLOT_TITLES
    from falconbench.render.rows import table_cells
    from falconbench.report import load_comparison

    folder = tmp_path / "ft"
    shutil.copytree(RECORDED if inference else FINETUNE, folder)
    if inference:
        with open(folder / "results.jsonl", "a") as handle:
            handle.write((FINETUNE / "results.jsonl").read_text())
    write_report([folder])
    seen, stderr = probe(folder / "report.html", tmp_path)
    assert seen["loaded"] == seen["images"] == len(list(folder.glob("*.png"))) >= (4 if inference else 1)
    assert PLOT_TITLES["finetune.png"] in seen["loadedAlts"]
    assert (PLOT_TITLES["memory.png"] in seen["loadedAlts"]) == inference
    inference_tables = len(table_cells(load_comparison([RECORDED]))) if inference else 0
    assert seen["tables"] == 14 + inference_tables  # the steps, the Δplan overview, a component table per setup
    assert seen["problems"] == [] and console_errors(stderr) == []


def test_the_report_page_screenshot_is_not_blank(report, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    done = chromium("--window-size=1280,2000", f"--screenshot={shot}", report.as_uri(), profile=tmp_path / "p")
    assert shot.is_file(), done.stderr[-2000:]
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page


def test_the_probe_catches_a_broken_image_and_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><table></table>'
                    '<img src="missing.png"><script>undefinedFunction();</script></body></html>')
    seen, stderr = probe(page, tmp_path)
    assert seen["images"] == 1 and seen["loaded"] == 0
    assert any("undefinedFunction" in p for p in seen["problems"])
    assert any("failed to load" in p for p in seen["problems"])
    assert console_errors(stderr)
