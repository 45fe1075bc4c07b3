"""Regenerate docs/mlflow_runs.png: the MLflow UI's run table (`make ui`'s command) on a
workspace's store, in headless Chromium, with every pipeline execution's parent run expanded.

    python docs/mlflow_screenshot.py [--root DIR]   # DIR: a workspace after `dvc repro` and
                                                    # a few `dvc exp run` (default: the repo)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _browser import MISSING, Browser, chromium, free_port, server_process  # noqa: E402

SERVER_START_S = 180  # `mlflow ui` boots its workers slowly on a busy machine


def _expand_parents(driver, page: Browser) -> int:
    """Click each parent run's expander (the table shows children collapsed); returns how many."""
    from selenium.webdriver.common.by import By

    expander = "button[data-component-id*='runnamecellrenderer']"
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']"), "the run table")
    count = len(driver.find_elements(By.CSS_SELECTOR, expander))
    for number in range(count):  # children have none: the n-th expander stays the n-th parent's
        driver.execute_script("arguments[0].click()",
                              driver.find_elements(By.CSS_SELECTOR, expander)[number])
        time.sleep(1)
    _widen(driver, "attributes.`Run Name`", 160)
    for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        driver.execute_script("arguments[0].click()", close)  # the assistant's side panel
    return count


def _widen(driver, column: str, pixels: int) -> None:
    """Drag the right edge of a column's header (the table truncates long run names)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    handle = driver.find_element(
        By.CSS_SELECTOR, f"[col-id='{column}'].ag-header-cell .ag-header-cell-resize")
    ActionChains(driver).drag_and_drop_by_offset(handle, pixels, 0).perform()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow_runs.png")
    args = parser.parse_args()
    if MISSING:
        sys.exit("; ".join(MISSING))
    from mlflow import MlflowClient

    from clipid.tracking import EXPERIMENT, tracking_uri, ui_command

    os.environ["DVC_ROOT"] = str(args.root.resolve())
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    experiment = MlflowClient(tracking_uri()).get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        sys.exit(f"{args.root}: no {EXPERIMENT!r} experiment in {tracking_uri()}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, server_process(
            ui_command(port=port), args.root, dict(os.environ), url + "/",
            Path(tmp) / "ui.log", SERVER_START_S), chromium(Path(tmp)) as driver:
        page = Browser(url, Path(tmp) / "ui.log", driver, args.out.parent, "mlflow")
        driver.set_window_size(1400, 1000)
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
        print(f"expanded {_expand_parents(driver, page)} parent run(s)")
        time.sleep(2)
        driver.save_screenshot(str(args.out))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
