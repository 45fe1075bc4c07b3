"""Headless Chromium for the browser tests (the MLflow UI, `clipid serve`): finding Debian's
chromium and chromium-driver, starting a server on a free loopback port and waiting for it,
and a screenshot of every checked page, passed or failed.

Screenshots land in $CLIPID_TEST_ARTIFACTS, else test-artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as error:
    _SELENIUM_MISSING: str | None = f"selenium is not importable ({error}; run `make env`)"
else:
    _SELENIUM_MISSING = None

REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = "install them with `apt-get install chromium chromium-driver`"
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
MISSING = [why for why in (_chromium_missing, _driver_missing, _SELENIUM_MISSING) if why]


def skip_without_browser(what: str) -> None:
    """Skip the calling test module, with the reason, where the browser cannot run."""
    if MISSING:
        pytest.skip(f"{what} needs Chromium, ChromeDriver and selenium: {'; '.join(MISSING)}; "
                    f"{INSTALL_HINT}", allow_module_level=True)


def artifacts_dir() -> Path:
    artifacts = Path(os.environ.get("CLIPID_TEST_ARTIFACTS") or REPO / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    return artifacts


def free_port() -> int:
    [port] = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: every socket stays bound until all are drawn (the
    kernel may hand out a port it just got back: about 2 in 1,000 groups of 8 draws repeat one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, start_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or is slow."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + start_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{' '.join(proc.args)} exited with {proc.returncode}:\n"
                        f"{log.read_text(errors='replace')}")
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{' '.join(proc.args)} did not answer on {url} within {start_s} s:\n"
                        f"{log.read_text(errors='replace')}")
        time.sleep(0.25)  # polling a server that boots, not waiting on the page


@contextlib.contextmanager
def server_process(cmd: list[str], cwd: Path, env: dict[str, str], url: str, log: Path,
                   start_s: float) -> Iterator[subprocess.Popen]:
    """``cmd`` running until the block ends, once ``url`` answers."""
    with log.open("wb") as out:
        # A session of its own: teardown stops the server and any workers together.
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_up(proc, url, log, start_s)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A headless Chromium driven through Debian's chromedriver, with its console log kept."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


@dataclass
class Browser:
    url: str
    log: Path  # the server's output
    driver: Any
    artifacts: Path
    prefix: str  # of the screenshots' names

    def diagnostics(self) -> str:
        """What a failure report needs: where the browser was, its console, the server's log."""
        lines = []
        with contextlib.suppress(WebDriverException):
            lines.append(f"browser at {self.driver.current_url}")
            lines += [f"console {e['level']}: {e['message']}"
                      for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        server = self.log.read_text(errors="replace").splitlines()[-60:]
        return "\n".join([*lines, f"--- {self.log.name} (tail) ---", *server])

    @contextlib.contextmanager
    def page(self, name: str) -> Iterator[None]:
        """Screenshot the page after its checks, passed or failed; a failure says why."""
        shot = self.artifacts / f"{self.prefix}-{name}.png"
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

    def wait(self, condition: Any, what: str) -> Any:
        # Re-renders replace elements under a running wait: look again, don't fail.
        waiting = WebDriverWait(self.driver, WAIT_S,
                                ignored_exceptions=(StaleElementReferenceException,))
        return waiting.until(condition, f"{what} not shown")
