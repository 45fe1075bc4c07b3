"""Regenerate docs/serve.png: `clipid serve` on a workspace after `make repro` (default: the
repository), a query image uploaded in headless Chromium, the page as it shows the results.

    python docs/serve_screenshot.py [--root DIR] [--image data/prepared/images/...png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _browser import MISSING, Browser, chromium, free_port, server_process  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO)
    parser.add_argument("--image", default="data/prepared/images/images/00239_0_png.png",
                        help="the query, relative to --root")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve.png")
    args = parser.parse_args()
    if MISSING:
        sys.exit("; ".join(MISSING))
    from selenium.webdriver.common.by import By

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with tempfile.TemporaryDirectory() as tmp, server_process(
            [sys.executable, "-m", "clipid", "serve", "--port", str(port)], args.root, env,
            url + "/api/health", Path(tmp) / "serve.log", 300), chromium(Path(tmp)) as driver:
        page = Browser(url, Path(tmp) / "serve.log", driver, args.out.parent, "serve")
        driver.set_window_size(1200, 900)
        driver.get(url + "/")
        driver.find_element(By.ID, "file").send_keys(str((args.root / args.image).resolve()))
        page.wait(lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#results img')];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"),
            "the results")
        driver.save_screenshot(str(args.out))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
