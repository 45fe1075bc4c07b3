"""The MLflow UI (`make ui`'s command) in a real headless Chromium, on a store a tiny pipeline
run filled: the clipid experiment, its runs and a metric chart are shown.

Needs Debian's chromium and chromium-driver (or CHROMIUM_BIN and CHROMEDRIVER); skips without
them. Screenshots of the checked pages land in $CLIPID_TEST_ARTIFACTS, else test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipid.tracking import EXPERIMENT, ui_command

from _browser import (
    Browser,
    artifacts_dir,
    chromium,
    free_port,
    server_process,
    skip_without_browser,
)
from conftest import VENV_BIN

skip_without_browser("MLflow UI browser test")

from selenium.webdriver.common.by import By  # noqa: E402 - selenium is there past the skip
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a pipeline run, a server start and a browser: ~1 min

# The tiny pipeline of tests/test_pipeline.py (its MICRO, without the stages run here).
MICRO = {
    "data": {
        "synthetic": {"items": 12, "views": 3, "image_size": 48},
        "cache_size": 32,
        "workers": 0,
    },
    "train": {"epochs": 1, "batch_size": 6, "pk_k": 3, "log_every": 1},
}
PIPELINE = (
    ["prepare"],
    ["clean-captions"],
    ["evaluate", "stage1"],
    ["train", "stage2"],  # a second run, with a metric history to chart
)
METRIC = "train/loss"  # logged every step by training: a line, not a single point
SERVER_START_S = 90  # `mlflow ui` (one uvicorn worker) answers in ~6 s on an idle machine


@dataclass
class Store:
    root: Path
    experiment_id: str
    runs: dict[str, str]  # run id -> run name
    metric_run: str  # the run whose METRIC history the chart shows
    history: list[tuple[int, float]]  # (step, value) of METRIC in metric_run, in logging order


class UI(Browser):
    def link(self, route: str, text: str) -> Any:
        """The visible link to the UI route ``route`` whose text is ``text``."""
        return self.wait(
            ec.visibility_of_element_located(
                (By.XPATH, f"//a[{_is_fragment(route)} and normalize-space() = '{text}']")
            ),
            f"a link {text!r} to {route}",
        )


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _env(root: Path) -> dict[str, str]:
    """The stages' and the server's environment: the venv's scripts, and this store only
    (a developer's MLFLOW_TRACKING_URI or DVC variables must not redirect the runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {
        **env,
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "DVC_ROOT": str(root),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A store filled by the pipeline's first stages on micro parameters (~30 s)."""
    root = tmp_path_factory.mktemp("ui-store")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, MICRO)))
    for args in PIPELINE:
        proc = subprocess.run(
            ["clipid", *args], cwd=root, env=_env(root), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"clipid {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"the pipeline logged no {EXPERIMENT!r} experiment"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 2, f"expected the stage1 and stage2 runs, got {len(runs)}"
    with_metric = [r for r in runs if METRIC in r.data.metrics]
    assert with_metric, f"no run logged {METRIC}"
    history = client.get_metric_history(with_metric[0].info.run_id, METRIC)
    assert len(history) >= 2, f"{METRIC} has {len(history)} point(s): no line to draw"
    return Store(
        root,
        experiment.experiment_id,
        {r.info.run_id: r.info.run_name for r in runs},
        with_metric[0].info.run_id,
        [(m.step, m.value) for m in history],
    )


@pytest.fixture(scope="module")
def server(store: Store) -> Iterator[tuple[str, Path]]:
    """`make ui`'s command on the store, on a free loopback port, until the module ends."""
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:  # ui_command reads the store from the environment
        mp.setenv("DVC_ROOT", str(store.root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cmd = ui_command(port=port)
    log = store.root / "mlflow-ui.log"
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, store.root, _env(store.root), url + "/", log, SERVER_START_S):
        yield url, log


@pytest.fixture(scope="module")
def ui(server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield UI(server[0], server[1], driver, artifacts_dir(), "mlflow-ui")


def _is_fragment(href: str) -> str:
    """XPath: the link's ``href`` points at the UI route ``href`` (the UI routes by fragment)."""
    return f"substring-after(@href, '#') = '{href}'"


def _drawn_line(driver: Any) -> Any:
    """A plotly line through two points or more (``d`` = "M x,y L x,y ..."), else False."""
    for path in driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line"):
        if "L" in (path.get_attribute("d") or ""):
            return path
    return False


def test_the_experiments_page_lists_clipid(ui: UI, store: Store) -> None:
    with ui.page("experiments"):
        ui.driver.get(f"{ui.url}/#/experiments")
        link = ui.link(f"/experiments/{store.experiment_id}", EXPERIMENT)
        assert link.text.strip() == EXPERIMENT


def test_the_experiment_shows_its_runs(ui: UI, store: Store) -> None:
    # The runs table, not /#/experiments/<id>: a fresh browser starts in the UI's GenAI mode,
    # which opens every experiment on its traces overview.
    with ui.page("runs"):
        ui.driver.get(f"{ui.url}/#/experiments/{store.experiment_id}/runs")
        for run_id, name in store.runs.items():
            link = ui.link(f"/experiments/{store.experiment_id}/runs/{run_id}", name)
            assert link.text.strip() == name


def test_a_metric_page_draws_the_metric_chart(ui: UI, store: Store) -> None:
    # The metric page, with the query the UI's own links to it carry (getMetricPageRoute).
    query = {
        key: json.dumps(value, separators=(",", ":"))
        for key, value in {
            "runs": [store.metric_run],
            "metric": METRIC,
            "experiments": [store.experiment_id],
            "plot_metric_keys": [METRIC],
            "plot_layout": {},
        }.items()
    }
    query.update(
        x_axis="step",
        y_axis_scale="linear",
        line_smoothness="1",
        show_point="false",
        deselected_curves="[]",
        last_linear_y_axis_range="[]",
    )
    with ui.page("metric"):
        ui.driver.get(f"{ui.url}/#/metric?{urllib.parse.urlencode(query)}")
        # Plotly draws asynchronously once the history arrives: wait for a drawn line.
        ui.wait(_drawn_line, f"a line of {METRIC} in a chart")
        card = ui.driver.find_element(
            By.CSS_SELECTOR, "[data-testid='experiment-view-compare-runs-card']"
        )
        plot = card.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
        assert plot.size["width"] > 100 and plot.size["height"] > 100, plot.size
        assert METRIC in card.text and store.runs[store.metric_run] in card.text, card.text

        # The table under the chart: latest, min and max of the history the store holds.
        row = ui.wait(
            ec.visibility_of_element_located((By.CSS_SELECTOR, f"tr[data-row-key='{METRIC}']")),
            f"the {METRIC} table row",
        )
        shown = {
            (int(step), float(value))
            for value, step in re.findall(r"(\S+) \(step=(\d+)\)", row.text)
        }
        latest = max(store.history, key=lambda point: point[0])
        for step, value in (
            latest,
            min(store.history, key=lambda point: point[1]),
            max(store.history, key=lambda point: point[1]),
        ):
            assert any(s == step and v == pytest.approx(value) for s, v in shown), (
                f"{METRIC} = {value} at step {step} not in the table row {row.text!r}"
            )
