"""Headless Chromium (Debian's package) for the pages users look at: a screenshot, the rendered DOM
and the console errors of one page."""

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--window-size=1400,1400"]


@dataclass
class Page:
    path: Path
    dom: str
    errors: list[str]


def _chromium(url: str, extra: list[str], wait_ms: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(["chromium", *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                               *extra, url], capture_output=True, text=True, timeout=120)


def screenshot(url: str, png: Path, wait_ms: int = 3000) -> Page:
    shot = _chromium(url, [f"--screenshot={png}"], wait_ms)
    dom = _chromium(url, ["--dump-dom"], wait_ms).stdout
    errors = [line for line in shot.stderr.splitlines()
              if ":CONSOLE" in line and (":ERROR:" in line or "Uncaught" in line)]
    return Page(png, dom, errors)


def colored_pixels(png: Path, rgb: tuple[int, int, int], tolerance: int = 30) -> int:
    """How many pixels are within `tolerance` (per channel) of `rgb`."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    r, g, b = rgb
    return sum(1 for pr, pg, pb in image.getdata()
               if abs(pr - r) <= tolerance and abs(pg - g) <= tolerance and abs(pb - b) <= tolerance)
