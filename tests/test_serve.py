"""`clipid serve`: the JSON API and its refusals against a real server process, and the page in
headless Chromium (skipped, with the reason, without Debian's chromium and chromium-driver).

The workspace is laid out like the repository after `dvc repro index`, on a tiny prepared data
set with Stage 1's model (the random tiny CLIP) as the image and text model. A random model
ranks other views of an item anywhere, but a gallery image sent as the query must come back
first with score 1: that checks that an upload is decoded, embedded and ranked exactly as the
gallery was. The page's assertions compare with the library's own ranking (`clipid search`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from clipid.config import params_from_dict
from clipid.data.dataset import PreparedData
from clipid.search.gallery import GalleryIndex
from clipid.search.query import search
from clipid.stages.clean_captions import clean_captions
from clipid.stages.index import index_stage
from clipid.stages.prepare import prepare
from clipid.workspace import Workspace as StageFiles  # Workspace here: the server under test

from _browser import MISSING, Browser, artifacts_dir, chromium, free_port, server_process
from conftest import png_header

MAX_UPLOAD_MB = 0.05  # a 50 KB limit: a valid noise PNG of 140 x 140 (58 KB) is over it
MAX_PIXELS = 40_000   # 200 x 200
MICRO = {"data": {"synthetic": {"items": 12, "views": 4, "image_size": 48}, "cache_size": 32,
                  "workers": 0},
         "search": {"model": {"image": "stage1", "text": "stage1"}},
         "serve": {"max_upload_mb": MAX_UPLOAD_MB, "max_top_k": 20, "max_pixels": MAX_PIXELS}}
# The same workspace served with one slot and a one-place queue, and room for a 56 MP upload
# whose decoding keeps that slot busy for about a second.
BUSY = {**MICRO, "serve": {"max_upload_mb": 1, "max_pixels": 60_000_000, "max_concurrent": 1,
                           "max_queued": 1, "queue_timeout_s": 60}}
SERVER_START_S = 120  # torch, open_clip and the model: ~10 s on an idle 2-core machine
TEXT = "a red striped shirt"


@dataclass
class Workspace:
    root: Path
    url: str
    log: Path
    proc: subprocess.Popen
    gallery: GalleryIndex  # as the server loaded it (relative paths, read from root)

    def image(self, row: int) -> str:
        """A gallery image as results name it (relative to the server's directory)."""
        return str(self.gallery.root / self.gallery.table["image"].iloc[row])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("serve")
    params = params_from_dict(MICRO)
    (root / "params.yaml").write_text(json.dumps(MICRO))  # what `clipid serve` reads
    prepare(params, StageFiles(root))
    clean_captions(params, StageFiles(root))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_ROOT", str(root))  # the index stage's MLflow run goes to this store
        mp.chdir(root)
        index_stage(params)  # in the working directory, as `dvc repro` runs it
        gallery = GalleryIndex.load(StageFiles().index_dir("stage1"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DVC_ROOT": str(root), "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "clipid", "serve", "--port", str(port)]
    log = root / "serve.log"
    with server_process(cmd, root, env, url + "/api/health", log, SERVER_START_S) as proc:
        yield Workspace(root, url, log, proc, gallery)


# ---------------------------------------------------------------------------------------------
# HTTP without dependencies: urllib, and multipart bodies written here

def call(ws: Workspace, path: str, body: bytes | None = None,
         content_type: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(ws.url + path, data=body, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                     f'filename="{file[0]}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + file[1] + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def search_image(ws: Workspace, data: bytes, name: str = "query.png",
                 **fields: str) -> tuple[int, dict]:
    status, body = call(ws, "/api/search", *multipart(fields, (name, data)))
    return status, json.loads(body)


def search_text(ws: Workspace, payload: dict | bytes) -> tuple[int, dict]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, body = call(ws, "/api/search", raw, "application/json")
    return status, json.loads(body)


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def library_search(ws: Workspace, monkeypatch: pytest.MonkeyPatch, **query) -> dict:
    """`clipid search --json`'s answer for the same query."""
    monkeypatch.chdir(ws.root)
    return search(params_from_dict(MICRO), **query).as_dict()


# ---------------------------------------------------------------------------------------------
# the API

def test_the_server_listens_on_loopback_only_by_default(workspace):
    listening = [c.laddr for c in psutil.Process(workspace.proc.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    port = urllib.parse.urlparse(workspace.url).port
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]


def test_health_names_the_loaded_model_and_its_index(workspace):
    status, body = call(workspace, "/api/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["default_model"] == {"image": "stage1", "text": "stage1"}
    assert health["models"]["stage1"]["images"] == len(workspace.gallery.table)
    assert health["models"]["stage1"]["dim"] == workspace.gallery.embeddings.shape[1]


def test_an_uploaded_gallery_image_finds_itself_with_the_fields_of_clipid_search(
        workspace, monkeypatch):
    image = workspace.image(4)
    data = (workspace.root / image).read_bytes()
    status, answer = search_image(workspace, data, "probe.png", top_k="5")
    assert status == 200, answer
    expected = library_search(workspace, monkeypatch, image=Path(image), top_k=5)
    assert answer.keys() == expected.keys()
    assert answer["query"] == {"image": "probe.png"}
    assert {k: answer[k] for k in ("model", "backend", "results")} == \
        {k: expected[k] for k in ("model", "backend", "results")}
    first = answer["results"][0]
    assert first["image"] == image and first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["item_id"] == workspace.gallery.table["item_id"].iloc[4]


def test_a_text_query_ranks_as_clipid_search_does(workspace, monkeypatch):
    status, answer = search_text(workspace, {"text": TEXT, "top_k": 7, "model": "stage1"})
    assert status == 200, answer
    assert answer == library_search(workspace, monkeypatch, text=TEXT, top_k=7)
    assert [r["rank"] for r in answer["results"]] == list(range(1, 8))


@pytest.mark.parametrize("name, send, status, message", [
    ("not an image", lambda ws: search_image(ws, b"just some text", "notes.png"),
     400, "notes.png: not an image"),
    ("empty file", lambda ws: search_image(ws, b"", "empty.png"),
     400, "empty.png: the uploaded file is empty"),
    ("over max_upload_mb", lambda ws: search_image(ws, png(140, 140), "big.png"),
     413, f"big.png: the upload is over {MAX_UPLOAD_MB} MB (serve.max_upload_mb)"),
    ("far over max_upload_mb", lambda ws: search_image(ws, png(400, 400), "huge.png"),
     413, f"the upload is over {MAX_UPLOAD_MB} MB"),
    ("a bomb Pillow refuses", lambda ws: search_image(ws, png_header(30_000, 30_000), "b.png"),
     413, "b.png: the image has more than 40,000 pixels (serve.max_pixels)"),
    ("a bomb only serve.max_pixels refuses",
     lambda ws: search_image(ws, png_header(201, 200), "w.png"),
     413, "w.png: the image has 201 x 200 pixels, more than 40,000 (serve.max_pixels)"),
    ("truncated image", lambda ws: search_image(ws, png(40, 40)[:200], "cut.png"),
     400, "cut.png: unreadable image"),
    ("empty text", lambda ws: search_text(ws, {"text": "   "}),
     400, "text: the query text is empty"),
    ("no text", lambda ws: search_text(ws, {"top_k": 3}), 400, "text: the query text is empty"),
    ("unknown model, text", lambda ws: search_text(ws, {"text": TEXT, "model": "stage9"}),
     400, "unknown model 'stage9': this server has loaded stage1"),
    ("unknown model, image",
     lambda ws: search_image(ws, png(20, 20), model="stage4"),
     400, "unknown model 'stage4': this server has loaded stage1"),
    ("top_k zero", lambda ws: search_text(ws, {"text": TEXT, "top_k": 0}),
     400, "top_k: 0 is not between 1 and 20 (serve.max_top_k)"),
    ("top_k not a number", lambda ws: search_image(ws, png(20, 20), top_k="ten"),
     400, "top_k: 'ten' is not a whole number"),
    ("not JSON", lambda ws: search_text(ws, b"{text: shirt"), 400, "the body is not JSON"),
    ("no query", lambda ws: (lambda s, b: (s, json.loads(b)))(
        *call(ws, "/api/search", b"text=shirt", "application/x-www-form-urlencoded")),
     415, "send a multipart/form-data image or an application/json text"),
])
def test_a_bad_query_is_a_4xx_with_a_message_and_the_server_keeps_serving(
        workspace, name, send, status, message):
    got, answer = send(workspace)
    assert (got, answer["detail"][:len(message)]) == (status, message), answer
    assert workspace.proc.poll() is None, f"the server died:\n{workspace.log.read_text()}"
    ok, answer = search_text(workspace, {"text": TEXT, "top_k": 2})
    assert ok == 200 and len(answer["results"]) == 2


def test_an_image_just_under_the_pixel_limit_is_answered(workspace):
    ramp = np.add.outer(np.arange(200), np.arange(200)).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(np.stack([ramp] * 3, -1)).save(data, format="PNG")
    assert MAX_PIXELS == 200 * 200 and len(data.getvalue()) < MAX_UPLOAD_MB * 2**20
    status, answer = search_image(workspace, data.getvalue(), "ramp.png", top_k="3")
    assert status == 200 and len(answer["results"]) == 3, answer


def post_image(ws: Workspace, data: bytes, name: str) -> tuple[int, dict, str | None]:
    """Status, JSON answer and Retry-After header of an image query."""
    body, content_type = multipart({}, (name, data))
    req = urllib.request.Request(ws.url + "/api/search", data=body,
                                 headers={"Content-Type": content_type})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=120) as response:
            return response.status, json.loads(response.read()), None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers.get("Retry-After")


def health_once(ws: Workspace) -> dict:
    status, body = call(ws, "/api/health")
    assert status == 200, body
    return json.loads(body)["busy"]


def wait_for(ws: Workspace, what: str, count: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while health_once(ws)[what] < count:
        assert time.monotonic() < deadline, f"never {count} {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def busy_server(workspace: Workspace) -> Iterator[Workspace]:
    """The workspace served once more with one slot and a one-place queue."""
    (workspace.root / "busy.yaml").write_text(json.dumps(BUSY))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DVC_ROOT": str(workspace.root),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "clipid", "serve", "--params", "busy.yaml", "--port", str(port)]
    log = workspace.root / "serve-busy.log"
    with server_process(cmd, workspace.root, env, url + "/api/health", log,
                        SERVER_START_S) as proc:
        yield Workspace(workspace.root, url, log, proc, workspace.gallery)


def test_beyond_the_queue_a_query_gets_503_with_retry_after_while_health_answers(busy_server):
    big = io.BytesIO()
    Image.new("RGB", (7_500, 7_500), (90, 140, 200)).save(big, format="PNG", compress_level=1)
    answers: dict[str, tuple] = {}
    first = threading.Thread(target=lambda: answers.update(
        big=post_image(busy_server, big.getvalue(), "big.png")))
    first.start()
    wait_for(busy_server, "running", 1)  # its decoding holds the only slot
    queued = threading.Thread(target=lambda: answers.update(
        text=search_text(busy_server, {"text": TEXT, "top_k": 2})))
    queued.start()
    wait_for(busy_server, "waiting", 1)
    # The queue overflows: the dearer of the waiting text and this upload is refused, at once.
    status, answer, retry = post_image(busy_server, big.getvalue(), "again.png")
    assert (status, retry) == (503, "1"), answer
    assert answer["detail"].startswith("the server is busy (1 requests in work and 1 waiting)")
    assert health_once(busy_server) == {"running": 1, "waiting": 1}
    first.join(120)
    queued.join(120)
    assert answers["big"][0] == 200 and answers["big"][1]["query"] == {"image": "big.png"}
    assert answers["text"][0] == 200 and len(answers["text"][1]["results"]) == 2
    assert health_once(busy_server) == {"running": 0, "waiting": 0}


def test_thumbnails_are_the_loaded_gallery_images_only(workspace):
    image = workspace.image(0)
    status, body = call(workspace, "/api/thumbnail?" + urllib.parse.urlencode({"image": image}))
    assert status == 200 and body == (workspace.root / image).read_bytes()

    prepared = PreparedData.load(StageFiles(workspace.root).prepared, with_texts=False)
    not_indexed = prepared.rows("query")["image"].iloc[0]
    assert (prepared.root / not_indexed).is_file()
    outside = [
        f"data/prepared/{not_indexed}",                  # a prepared image, but not in the index
        "params.yaml",                                   # a file of the workspace
        f"{Path(image).parent}/../../../params.yaml",    # ../ from a gallery image
        str(workspace.root / image),                     # absolute, even of a gallery image
        "/etc/passwd",
        urllib.parse.quote(image, safe=""),              # encoded once more than the URL needs
        "..%2F..%2Fparams.yaml",
        "",
    ]
    for path in outside:
        status, _ = call(workspace, "/api/thumbnail?" + urllib.parse.urlencode({"image": path}))
        assert status == 404, path
    for raw in ("/api/thumbnail/../../params.yaml", "/api/thumbnail?image=..%2F..%2Fparams.yaml",
                "/api/thumbnail?image=%2Fetc%2Fpasswd", "/params.yaml", "/data/prepared/"):
        status, _ = call(workspace, raw)
        assert status == 404, raw


# ---------------------------------------------------------------------------------------------
# the page in headless Chromium

browser_test = pytest.mark.skipif(
    bool(MISSING), reason=f"the page test needs Chromium, ChromeDriver and selenium: "
                          f"{'; '.join(MISSING)}; apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def page(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        browser = Browser(workspace.url, workspace.log, driver, artifacts_dir(), "serve")
        driver.get(workspace.url + "/")
        yield browser


def _results(page: Browser, generation: int) -> list[dict]:
    """The grid once its ``generation``-th result set is drawn, with every thumbnail loaded."""
    from selenium.webdriver.common.by import By

    def drawn(driver):
        grid = driver.find_element(By.ID, "results")
        if int(grid.get_attribute("data-generation")) < generation:
            return False
        cards = grid.find_elements(By.CSS_SELECTOR, ".result")
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('#results img')].every("
            "i => i.complete && i.naturalWidth > 0)")
        return cards if cards and loaded else False

    cards = page.wait(drawn, f"result set {generation} with its thumbnails")
    return [{"image": c.get_attribute("data-image"),
             "rank": c.find_element(By.CLASS_NAME, "rank").text,
             "score": c.find_element(By.CLASS_NAME, "score").text,
             "identity": c.find_element(By.CLASS_NAME, "identity").text,
             "link": c.find_element(By.CLASS_NAME, "similar")} for c in cards]


def _generation(page: Browser) -> int:
    from selenium.webdriver.common.by import By

    return int(page.driver.find_element(By.ID, "results").get_attribute("data-generation"))


@browser_test
def test_the_page_finds_an_uploaded_image_first_and_searches_a_result(page, workspace):
    from selenium.webdriver.common.by import By

    image = workspace.image(5)
    identity = workspace.gallery.table["item_id"].iloc[5]
    with page.page("image"):
        n = _generation(page)
        page.driver.find_element(By.ID, "file").send_keys(str(workspace.root / image))
        cards = _results(page, n + 1)
        assert len(cards) == 10  # the page's default top_k
        assert [c["rank"] for c in cards] == [f"#{r}" for r in range(1, 11)]
        assert cards[0]["image"] == image and cards[0]["identity"] == identity
        assert cards[0]["score"] == "1.000"
        scores = [float(c["score"]) for c in cards]
        assert scores == sorted(scores, reverse=True)
        status = page.driver.find_element(By.ID, "status").text
        assert status.startswith("10 results for image ") and "model stage1" in status

    # "search with this image" on the third result: that image is now first, with score 1.
    third = cards[2]
    with page.page("similar"):
        third["link"].click()
        cards = _results(page, n + 2)
        assert cards[0]["image"] == third["image"]
        assert cards[0]["identity"] == third["identity"] and cards[0]["score"] == "1.000"
        query = urllib.parse.parse_qs(urllib.parse.urlparse(page.driver.current_url).query)
        assert query == {"similar": [third["image"]]}


@browser_test
def test_the_page_takes_a_dropped_image(page, workspace):
    image = workspace.image(8)
    with page.page("drop"):
        n = _generation(page)
        # What a drop of a file from the desktop delivers: a DataTransfer holding a File.
        page.driver.execute_async_script("""
            const [image, done] = arguments;
            fetch('/api/thumbnail?image=' + encodeURIComponent(image)).then(r => r.blob())
              .then(blob => {
                const data = new DataTransfer();
                data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
                const zone = document.querySelector('#drop');
                for (const type of ['dragenter', 'dragover', 'drop'])
                  zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true,
                                                          cancelable: true}));
                done(true);
              });
        """, image)
        cards = _results(page, n + 1)
        assert cards[0]["image"] == image and cards[0]["score"] == "1.000"


@browser_test
def test_the_page_searches_a_typed_text_like_clipid_search(page, workspace, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    expected = library_search(workspace, monkeypatch, text=TEXT, top_k=10)["results"]
    with page.page("text"):
        n = _generation(page)
        box = page.driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(TEXT, Keys.ENTER)
        cards = _results(page, n + 1)
        assert [(c["image"], c["identity"], c["score"]) for c in cards] == \
            [(r["image"], r["item_id"], f"{r['score']:.3f}") for r in expected]
        assert TEXT in page.driver.find_element(By.ID, "status").text


@browser_test
def test_the_page_shows_why_an_upload_is_refused(page, workspace):
    from selenium.webdriver.common.by import By

    notes = workspace.root / "notes.png"
    notes.write_text("not a picture")
    with page.page("error"):
        n = _generation(page)
        page.driver.find_element(By.ID, "file").send_keys(str(notes))
        status = page.wait(lambda d: (s := d.find_element(By.ID, "status")).get_attribute(
            "class") == "error" and s, "the error message")
        assert status.text.startswith("error 400: notes.png: not an image"), status.text
        assert _generation(page) == n  # the last results stay
