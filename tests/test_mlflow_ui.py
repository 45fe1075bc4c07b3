"""The MLflow UI (`make ui`'s command) in a real headless Chromium, on a store a tiny pipeline
run filled: the clipid experiment, its runs and a metric chart are shown.

Needs Debian's chromium and chromium-driver (or CHROMIUM_BIN and CHROMEDRIVER); skips without
them. Screenshots of the checked pages land in $CLIPID_TEST_ARTIFACTS, else test-artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipid.tracking import EXPERIMENT, ui_command

from conftest import VENV_BIN

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as error:
    _SELENIUM_MISSING: str | None = f"selenium is not importable ({error}; run `make env`)"
else:
    _SELENIUM_MISSING = None

REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = "install them with `apt-get install chromium chromium-driver`"


def _executable(env_var: str, *names: str) -> tuple[str | None, str]:
    """The program ``env_var`` names, else the first of ``names`` on PATH; else why not."""
    if os.environ.get(env_var):
        path = os.environ[env_var]
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path, ""
        return None, f"{env_var}={path} is not an executable file"
    for name in names:
        if found := shutil.which(name):
            return found, ""
    return None, f"{' or '.join(names)} is not on PATH (or set {env_var})"


CHROMIUM, _chromium_missing = _executable("CHROMIUM_BIN", "chromium", "chromium-browser")
CHROMEDRIVER, _driver_missing = _executable("CHROMEDRIVER", "chromedriver")
_missing = [why for why in (_chromium_missing, _driver_missing, _SELENIUM_MISSING) if why]
if _missing:
    pytest.skip(
        "MLflow UI browser test needs Chromium, ChromeDriver and selenium: "
        f"{'; '.join(_missing)}; {INSTALL_HINT}",
        allow_module_level=True,
    )

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
    ["zeroshot"],
    ["train", "stage2"],
    ["evaluate", "stage2"],
)
METRIC = "train/loss"  # logged every step by training: a line, not a single point
SERVER_START_S = 90  # `mlflow ui` boots 4 uvicorn workers: ~20 s on an idle machine
WAIT_S = 30  # for one page element to show
# Without the background-networking flags Chromium's own connections get refused here;
# the resolver rule keeps the browser on loopback, so the test is the same with internet.
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1400,1000",
)


@dataclass
class Store:
    root: Path
    experiment_id: str
    runs: dict[str, str]  # run id -> run name
    metric_run: str  # the run whose METRIC history the chart shows
    history: list[tuple[int, float]]  # (step, value) of METRIC in metric_run, in logging order


@dataclass
class UI:
    url: str
    log: Path
    driver: Any
    artifacts: Path

    def diagnostics(self) -> str:
        """What a failure report needs: where the browser was, its console, the server's log."""
        lines = []
        with contextlib.suppress(WebDriverException):
            lines.append(f"browser at {self.driver.current_url}")
            lines += [
                f"console {e['level']}: {e['message']}"
                for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE"
            ]
        server = self.log.read_text(errors="replace").splitlines()[-60:]
        return "\n".join([*lines, "--- mlflow ui log (tail) ---", *server])

    @contextlib.contextmanager
    def page(self, name: str) -> Iterator[None]:
        """Screenshot the page after its checks, passed or failed; a failure says why."""
        shot = self.artifacts / f"mlflow-ui-{name}.png"
        shot.unlink(missing_ok=True)
        try:
            yield
        except (AssertionError, WebDriverException) as error:
            # The driver's message without its native stack trace, which says nothing here.
            message = error.msg if isinstance(error, WebDriverException) else None
            failure: str | None = f"{type(error).__name__}: {message or error}"
            with contextlib.suppress(WebDriverException):
                self.driver.save_screenshot(str(shot))
        else:
            failure = None
        if failure is not None:  # outside `except`: a report without the chained duplicate
            pytest.fail(f"{failure}\nscreenshot: {shot}\n{self.diagnostics()}")
        assert self.driver.save_screenshot(str(shot)), f"no screenshot of {name}"
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, f"{shot}: not a PNG"

    def link(self, route: str, text: str) -> Any:
        """The visible link to the UI route ``route`` whose text is ``text``."""
        return self.wait(
            ec.visibility_of_element_located(
                (By.XPATH, f"//a[{_is_fragment(route)} and normalize-space() = '{text}']")
            ),
            f"a link {text!r} to {route}",
        )

    def wait(self, condition: Any, what: str) -> Any:
        # React re-renders replace elements under a running wait: look again, don't fail.
        waiting = WebDriverWait(
            self.driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)
        )
        return waiting.until(condition, f"{what} not shown")


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
    assert len(runs) >= 2, f"expected the zeroshot and stage2 runs, got {len(runs)}"
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(store: Store) -> Iterator[tuple[str, Path]]:
    """`make ui`'s command on the store, on a free loopback port, until the module ends."""
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:  # ui_command reads the store from the environment
        mp.setenv("DVC_ROOT", str(store.root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cmd = ui_command(port=port)
    log = store.root / "mlflow-ui.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        # A session of its own: teardown stops the server and its uvicorn workers together.
        proc = subprocess.Popen(
            cmd,
            cwd=store.root,
            env=_env(store.root),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_up(proc, url, log)
        yield url, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"{' '.join(proc.args)} exited with {proc.returncode}:\n"
                f"{log.read_text(errors='replace')}"
            )
        try:
            with opener.open(url + "/", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"the MLflow UI did not answer on {url} within {SERVER_START_S} s:\n"
                f"{log.read_text(errors='replace')}"
            )
        time.sleep(0.25)  # polling a server that boots, not waiting on the page


@pytest.fixture(scope="module")
def ui(server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    artifacts = Path(os.environ.get("CLIPID_TEST_ARTIFACTS") or REPO / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield UI(server[0], server[1], driver, artifacts)
    finally:
        driver.quit()


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
