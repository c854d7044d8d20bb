"""Open a rendered HTML file in headless Chromium: what it drew and which script errors it logged."""
import re
import subprocess

from conftest import chromium


def open_in_chromium(path, wait_ms: int = 15000) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, console messages) for the HTML file at `path`, offline."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--virtual-time-budget={wait_ms}", "--proxy-server=127.0.0.1:9", "--dump-dom", f"file://{path}"],
        capture_output=True, text=True, timeout=300)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def drawn_plots(dom: str) -> int:
    "The number of plotly figures that plotly.js drew into the page."
    return len(re.findall(r'class="plot-container', dom))


def script_errors(console: list[str]) -> list[str]:
    return [line for line in console if re.search(r"Uncaught|Error|Failed", line)]
