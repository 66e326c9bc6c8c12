"""The HTTP service, tested with real HTTP requests against a running server on loopback, and its
web page in a real headless browser (Debian's chromium, driven by selenium)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image
from xray_files import bomb_png, dicom_bytes

from cxrlearn.data.decoding.images import find_images, load_grayscale
from cxrlearn.findings import FINDINGS
from cxrlearn.inference.predictor import Predictor

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 2 * 1024 * 1024  # small, so the over-limit case stays quick
UPLOAD_TIMEOUT = 3.0  # short, so the stalled-upload case stays quick


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_service(run, connections: dict | None = None, app=None, **options):
    """The service (``app``, or one made with ``options``) on a free loopback port, in a thread of this process,
    configured as `serve` configures it; stopped when the generator closes."""
    import uvicorn

    from cxrlearn.serving.app import create_app, server_config

    port = _free_port()
    app = app or create_app(run, max_upload_bytes=UPLOAD_LIMIT, upload_timeout_s=UPLOAD_TIMEOUT, **options)
    config = server_config(app, "127.0.0.1", port, log_level="warning", **(connections or {}))
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", run
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(evaluated):
    yield from _run_service(evaluated[0])


@pytest.fixture(scope="module")
def strict_server(evaluated):
    yield from _run_service(evaluated[0], strict=True)


def _post(url: str, name: str, data: bytes, query: str = "", content_type: str = "application/octet-stream",
          headers: dict | None = None, with_headers: bool = False):
    """POST one multipart file; return (status, parsed JSON body), and the response headers if asked."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/v1/predict{query}", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        answer = err.code, json.loads(err.read() or b"{}"), err.headers
    return answer if with_headers else answer[:2]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def xray(sample_images):
    return load_grayscale(sample_images / "00000013_003.png")


def test_health_and_model_metadata(server):
    url, run = server
    assert _get(f"{url}/healthz") == (200, b'{"status":"ok"}')
    status, body = _get(f"{url}/v1/model")
    meta = json.loads(body)
    assert status == 200 and meta["findings"] == list(FINDINGS)
    assert meta["preprocessing"]["input_size"] == 64 and set(meta["thresholds"]) == set(FINDINGS)


def test_predict_png_and_dicom_with_heatmap(server, xray):
    url, run = server
    status, body = _post(url, "chest.png", _png(xray), "?cam=top")
    assert status == 200, body
    assert body["image"] == "chest.png" and list(body["probabilities"]) == list(FINDINGS)
    expected = Predictor(run).predict([xray], ["chest.png"])[0]
    assert np.allclose([body["probabilities"][f] for f in FINDINGS], [expected.probabilities[f] for f in FINDINGS],
                       atol=1e-6)
    assert body["positive_findings"] == expected.positive
    heat = body["heatmap"]
    assert heat["finding"] == max(expected.probabilities, key=expected.probabilities.get)
    overlay = Image.open(io.BytesIO(base64.b64decode(heat["overlay_png"])))
    # At the upload's own resolution (not the 64 px network input), with a caption below it.
    assert overlay.size[0] == xray.shape[1] and overlay.size[1] > xray.shape[0] and overlay.mode == "RGB"
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(heat["image_png"]))))
    assert np.array_equal(shown, xray)  # the page shows the uploaded image itself
    dicom = dicom_bytes(4080 - xray.astype(np.uint16) * 16, bits=12, photometric="MONOCHROME1", window=(2040.5, 4081))
    status, from_dicom = _post(url, "chest.dcm", dicom, content_type="application/dicom")
    assert status == 200, from_dicom
    assert np.allclose(list(from_dicom["probabilities"].values()), list(body["probabilities"].values()), atol=1e-6)


def _at_once(calls) -> list:
    """Each of ``calls`` (functions of no argument) in its own thread, started together; their results in order."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i):
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_requests_that_arrive_together_share_a_forward_pass(evaluated, sample_images):
    """With --max-batch 8 and a long --batch-wait-ms, eight clients posting at once are answered from fewer
    passes than requests, each as if alone; an undecodable upload among them is refused by name (422) and
    delays or fails none of the others."""
    from cxrlearn.serving.app import create_app

    run = evaluated[0]
    app = create_app(run, max_upload_bytes=UPLOAD_LIMIT, upload_timeout_s=UPLOAD_TIMEOUT, max_batch=8,
                     batch_wait_ms=400)
    paths = [sample_images / name for name in sorted(find_images(sample_images))[:7]]
    uploads = [(path.name, path.read_bytes()) for path in paths] + [("broken.png", b"\x89PNG\r\n\x1a\n not an image")]
    service = _run_service(run, app=app)
    url, _ = next(service)
    try:
        answers = _at_once([lambda name=name, data=data: _post(url, name, data) for name, data in uploads])
    finally:
        service.close()
    assert answers[-1][0] == 422 and "broken.png" in answers[-1][1]["detail"]
    alone = Predictor(run).predict([load_grayscale(path) for path in paths], [path.name for path in paths])
    for (status, body), expected in zip(answers[:-1], alone):
        assert status == 200, body
        assert body["image"] == expected.image and body["input_check"] == expected.input_check
        assert np.allclose([body["probabilities"][f] for f in FINDINGS],
                           [expected.probabilities[f] for f in FINDINGS], atol=1e-5)
    batcher = app.state.batcher
    assert batcher.images == 7 and batcher.batches < 7, (batcher.batches, batcher.images)


def test_a_batch_that_fails_fails_only_the_image_at_fault(evaluated, xray):
    """A forward pass that raises is run again image by image: the others get their answers."""
    from cxrlearn.inference.predictor import Prepared
    from cxrlearn.serving.batching import Batcher

    predictor = Predictor(evaluated[0])
    batcher = Batcher(predictor, max_batch=4, wait_s=0.4)
    good = predictor.prepare(xray)
    odd = Prepared(np.zeros((64, 64, 3), np.uint8), None)  # colour: the network cannot take it, alone or not
    try:
        with batcher.arriving():  # a request on its way: the batch waits (0.4 s) and gathers all four
            answers = _at_once([lambda p=p: _answer_or_error(batcher, p) for p in (good, odd, good, good)])
    finally:
        batcher.close()
    expected = predictor.predict_prepared([good], ["x"])[0].probabilities
    for answer in (answers[0], answers[2], answers[3]):
        assert np.allclose(list(answer.probabilities.values()), list(expected.values()), atol=1e-5)
    assert isinstance(answers[1], Exception)
    assert batcher.images == 3


def _answer_or_error(batcher, prepared):
    try:
        return batcher.predict(prepared, "x")
    except Exception as err:  # noqa: BLE001 - the test looks at it
        return err


def test_a_turned_xray_gets_a_warning_and_strict_refuses_it(server, strict_server, xray):
    url, _ = server
    status, upright = _post(url, "chest.png", _png(xray))
    assert status == 200 and upright["input_check"] == "ok" and upright["input_score"] < 1
    status, turned = _post(url, "turned.png", _png(np.rot90(xray).copy()))
    assert status == 200 and turned["input_check"].startswith("warning: looks rotated"), turned
    strict_url, _ = strict_server
    status, refused = _post(strict_url, "turned.png", _png(np.rot90(xray).copy()))
    assert status == 422 and refused["detail"].startswith("turned.png: refused: looks rotated"), refused
    assert _post(strict_url, "chest.png", _png(xray))[0] == 200


def test_bad_input_gets_a_clear_4xx_and_never_kills_the_service(server, xray):
    url, _ = server
    good = _png(xray)
    rgba = np.dstack([np.repeat(xray[..., None], 3, axis=2), np.full(xray.shape, 255, np.uint8)])
    cases = {
        "empty upload": ("empty.png", b"", 422, "the upload is empty"),
        "not an image": ("notes.png", b"this is a radiology report, not an image", 422, "not an image file"),
        "truncated PNG": ("cut.png", good[: len(good) // 2], 422, "cannot decode image"),
        "20000x20000 PNG": ("bomb.png", bomb_png(20000, 20000), 413, "implausibly large"),
        "DICOM without pixels": ("report.dcm", dicom_bytes(xray, bits=8, without_pixels=True), 422, "no pixel data"),
        "over the size limit": ("big.png", good + b"\x00" * (UPLOAD_LIMIT + 1), 413, "over the limit"),
        "path separators": ("../../etc/passwd.png", good, 400, "without path separators"),
        "unknown cam finding": ("chest.png", good, 422, "cam must be 'top' or one of"),
    }
    for what, (name, data, status, message) in cases.items():
        query = "?cam=Pneumo" if what == "unknown cam finding" else ""
        got, body = _post(url, name, data, query)
        assert got == status, (what, got, body)
        assert message in body["detail"], (what, body)
    # python-multipart itself reduces a Windows path (as old browsers sent) to its last part.
    got, body = _post(url, "C:\\scans\\chest.png", good)
    assert got == 200 and body["image"] == "chest.png"
    # RGBA is an image: composited onto black (opaque here), it predicts as the gray image does.
    got, body = _post(url, "rgba.png", _png(rgba))
    gray_status, gray = _post(url, "gray.png", good)
    assert got == gray_status == 200
    assert np.allclose(list(body["probabilities"].values()), list(gray["probabilities"].values()), atol=1e-6)
    assert _get(f"{url}/healthz")[0] == 200


def _raw_request(url: str, head: bytes, parts, pause: float = 0.0) -> tuple[int, float]:
    """Send ``head`` then each of ``parts`` on a raw socket (stopping early if the server answers);
    return the status the server answers with and the seconds it took."""
    host, port = url.removeprefix("http://").split(":")
    started = time.time()
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head)
        for part in parts:
            try:
                connection.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server has answered and closed: what we would still send is refused
        if pause:
            time.sleep(pause)
        answer = connection.recv(4096)
    return int(answer.split(b" ", 2)[1]), time.time() - started


def test_the_service_is_bounded(server):
    url, _ = server
    # A 16-bit 9000 x 9000 PNG is a few hundred bytes of header here (157 KB as a real file): refused from its
    # header, before its 162 MB of pixels are decoded.
    got, body = _post(url, "big16.png", bomb_png(9000, 9000, bits=16))
    assert got == 413 and "implausibly large" in body["detail"] and "162 MB" not in body["detail"]
    # A 4,000 x 4,000 16-bit header (32 MB decoded: a large radiograph) is within the budget: it fails only
    # later, for its missing pixel data.
    got, body = _post(url, "large16.png", bomb_png(4000, 4000, bits=16))
    assert got == 422
    # A chunked upload of unknown length is counted while it streams and refused at the limit.
    path = url.split("/", 3)[2]
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {path}\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
    block = b"\x00" * 65536
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    sent = [chunk] * (2 * UPLOAD_LIMIT // len(block))  # twice the limit, never finished
    status, _ = _raw_request(url, head, sent)
    assert status == 413
    # An upload that stalls is answered 408 after the timeout, and its connection closed.
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {path}\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
    status, seconds = _raw_request(url, head, [b"--x\r\n"])
    assert status == 408 and UPLOAD_TIMEOUT - 0.5 < seconds < UPLOAD_TIMEOUT + 10
    request = urllib.request.Request(f"{url}/healthz", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def _browser():
    """Debian's chromium, headless, driven by selenium (skipped where absent, but never under CI)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_in_a_headless_browser(server, sample_images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    browser = _browser()
    try:
        browser.get(f"{url}/")
        assert "cxrlearn" in browser.title
        WebDriverWait(browser, 30).until(lambda b: "px" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(sample_images / "00000013_003.png"))
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#bars .row")) == len(FINDINGS))
        rows = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
        assert [r.get_attribute("data-finding") for r in rows] == list(FINDINGS)
        assert all(r.find_element(By.CSS_SELECTOR, ".value").text.endswith("%") for r in rows)
        # A finding without a threshold says so, and is never red (the attack saw red bold on 3.5% Cardiomegaly).
        uncalled = [r for r in rows if "uncalled" in r.get_attribute("class")]
        assert uncalled and all(r.find_element(By.CSS_SELECTOR, ".name").text.endswith("(not called)")
                                and "positive" not in r.get_attribute("class") for r in uncalled)
        picture = browser.find_element(By.ID, "picture")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return arguments[0].naturalWidth", picture) > 0)
        # The heatmap over the upload at the upload's own 256 px (not the network's 64), then the upload itself.
        assert browser.execute_script("return arguments[0].naturalWidth", picture) == 256
        assert browser.execute_script("return arguments[0].naturalHeight", picture) > 256
        browser.find_element(By.ID, "show-heat").click()
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                      picture) == [256, 256]
        browser.find_element(By.ID, "show-heat").click()
        assert "00000013_003.png" in browser.find_element(By.ID, "status").text
        assert not browser.find_element(By.ID, "input-warning").is_displayed()
        browser.save_screenshot(str(tmp_path / "page.png"))
        # A turned film: a clear warning above the bars.
        Image.fromarray(np.rot90(load_grayscale(sample_images / "00000013_003.png")).copy()).save(tmp_path / "t.png")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "t.png"))
        warning = browser.find_element(By.ID, "input-warning")
        WebDriverWait(browser, 60).until(lambda b: warning.is_displayed())
        assert "looks rotated" in warning.text and "before reading any number" in warning.text
        # A bad file: the page says why, and nothing breaks.
        (tmp_path / "notes.png").write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.png"))
        WebDriverWait(browser, 30).until(lambda b: "Could not use notes.png" in b.find_element(By.ID, "status").text)
        assert "not an image file" in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()


# ---- tracing and the API key (issue 18, item 10) -----------------------------------------------------------

def test_answers_name_their_model_and_request(server, xray, caplog):
    import logging

    from cxrlearn import __version__
    from cxrlearn.model.bundle import bundle_digest

    url, run = server
    with caplog.at_level(logging.INFO, logger="cxrlearn.serving.app"):
        status, body, headers = _post(url, "chest.png", _png(xray), headers={"X-Request-ID": "ward-7:0042"},
                                      with_headers=True)
        assert status == 200
        assert body["model_sha256"] == bundle_digest(run) and len(body["model_sha256"]) == 64
        assert body["cxrlearn_version"] == __version__
        assert body["request_id"] == headers["X-Request-ID"] == "ward-7:0042"
        deadline = time.time() + 5  # the line is logged once the response is sent: it may follow the answer
        assert (body["runtime"], len(body["runtime_sha256"])) == ("torch", 64) and isinstance(body["not_called"], list)
        while not any("request ward-7:0042 from 127.0.0.1: POST /v1/predict 200" in r.getMessage()
                      for r in caplog.records):
            assert time.time() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
    # Without a usable id (or with one that could forge log lines), a new one; errors carry it too.
    status, body, headers = _post(url, "empty.png", b"", headers={"X-Request-ID": "a\tb"}, with_headers=True)
    assert status == 422 and len(headers["X-Request-ID"]) == 32 and headers["X-Request-ID"] != "a\tb"
    _, model = _get(f"{url}/v1/model")
    assert json.loads(model)["model_sha256"] == bundle_digest(run)


def test_the_service_says_at_start_what_it_serves_and_long_running_logs_carry_the_time(evaluated, caplog, capsys):
    """Its start-up line names the model's digest, the runtime and its file, and whether a key is required; the
    service's and the DICOM node's lines begin with the time (read days later, beside the PACS's own logs)."""
    import logging
    import re

    from cxrlearn.cli.main import _show_library_log
    from cxrlearn.model.bundle import bundle_digest
    from cxrlearn.serving.app import create_app

    run = evaluated[0]
    with caplog.at_level(logging.INFO, logger="cxrlearn.serving.app"):
        create_app(run)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("serving "))
    assert bundle_digest(run) in line and "run by torch" in line and "no API key is required" in line
    _show_library_log(timestamps=True)
    try:
        capsys.readouterr()  # what was shown before (the start-up line, where a handler already showed it)
        logging.getLogger("cxrlearn.serving.app").warning("a line")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d warning: a line\n",
                            capsys.readouterr().err)
    finally:
        _show_library_log(timestamps=False)


@pytest.fixture(scope="module")
def keyed_server(evaluated, tmp_path_factory):
    yield from _run_service(evaluated[0], api_key="k" * 20 + "-secret")


def test_a_service_with_a_key_refuses_requests_without_it(keyed_server, xray, tmp_path):
    from cxrlearn.errors import ConfigError
    from cxrlearn.serving.app import read_api_key

    url, _ = keyed_server
    key = "k" * 20 + "-secret"
    assert _post(url, "chest.png", _png(xray))[0] == 401
    assert _post(url, "chest.png", _png(xray), headers={"Authorization": "Bearer wrong"})[0] == 401
    assert _post(url, "chest.png", _png(xray), headers={"Authorization": f"Bearer {key}"})[0] == 200
    assert _post(url, "chest.png", _png(xray), headers={"X-API-Key": key})[0] == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"{url}/v1/model")
    assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"] == "Bearer"
    assert _get(f"{url}/healthz")[0] == 200  # liveness checks need no key
    assert _get(f"{url}/")[0] == 200  # nor the page, which asks for it
    (tmp_path / "key").write_text(key + "\n")
    assert read_api_key(tmp_path / "key") == key
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        read_api_key(tmp_path / "short")
    with pytest.raises(ConfigError, match="no such API key file"):
        read_api_key(tmp_path / "missing")


def test_the_page_asks_for_the_key_once(keyed_server, sample_images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = keyed_server
    browser = _browser()
    try:
        browser.get(f"{url}/")
        # In a password field (the attack: window.prompt showed the key as it was typed), not an alert.
        form = browser.find_element(By.ID, "key-form")
        WebDriverWait(browser, 30).until(lambda b: form.is_displayed())
        assert not expected_conditions.alert_is_present()(browser)
        field = browser.find_element(By.ID, "key")
        assert field.get_attribute("type") == "password" and "API key" in form.text
        field.send_keys("k" * 20 + "-secret")
        form.find_element(By.CSS_SELECTOR, "button").click()
        WebDriverWait(browser, 30).until(lambda b: "px" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(sample_images / "00000013_003.png"))
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#bars .row")) == len(FINDINGS))
        assert not form.is_displayed()  # asked once, not again
        # What computed the answer, on the page: the request, the model, the runtime and its file, the input score.
        said = browser.find_element(By.ID, "provenance").text
        assert "request " in said and "run by torch (file " in said and "input score " in said
    finally:
        browser.quit()


# ---- idle connections cannot shut the service out (issue 19, item 7) ---------------------------------------

@pytest.fixture(scope="module")
def guarded_server(evaluated):
    yield from _run_service(evaluated[0], connections={"max_connections": 6, "header_timeout_s": 1.5})


def test_idle_connections_cannot_shut_out_health_checks_or_clients(guarded_server):
    url, _ = guarded_server
    host, port = url.removeprefix("http://").split(":")
    idle = []
    for i in range(6):  # the service's whole limit: some say nothing, some send unfinished headers
        connection = socket.create_connection((host, int(port)), timeout=10)
        if i % 2:
            connection.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n")
        idle.append(connection)
    time.sleep(0.3)
    assert _get(f"{url}/healthz")[0] == 200  # a slot is kept for health checks ...
    with pytest.raises(urllib.error.HTTPError) as full:
        _get(f"{url}/v1/model")  # ... but not for other requests while the service is full
    assert full.value.code == 503
    started = time.monotonic()
    for connection in idle:  # each is closed by the service once its headers are overdue (1.5 s here)
        connection.settimeout(10)
        try:
            while connection.recv(4096):
                pass
        except ConnectionResetError:
            pass
        connection.close()
    assert time.monotonic() - started < 5
    assert _get(f"{url}/v1/model")[0] == 200  # and clients are served again


def test_the_nginx_example_proxies_the_service(server, tmp_path, xray):
    """docs/deploy/nginx.conf, with only its ports changed, in front of the running service."""
    import re
    import subprocess

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        message = "Debian's nginx is needed (apt-get install nginx-light)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    url, _ = server
    service_port = url.rsplit(":", 1)[1]
    proxy_port = _free_port()
    example = (REPO / "docs" / "deploy" / "nginx.conf").read_text()
    config = re.sub(r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{service_port};", example)
    config = re.sub(r"listen 8080;", f"listen 127.0.0.1:{proxy_port};", config)
    assert config != example
    (tmp_path / "nginx.conf").write_text(config)
    started = subprocess.run([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon on;"],
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    try:
        proxy = f"http://127.0.0.1:{proxy_port}"
        deadline = time.time() + 10
        while True:
            try:
                assert _get(f"{proxy}/healthz")[0] == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline
                time.sleep(0.1)
        status, body, headers = _post(proxy, "chest.png", _png(xray), with_headers=True)
        assert status == 200 and body["request_id"] == headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])  # nginx's $request_id, echoed by the service
    finally:
        subprocess.run([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-s", "quit"],
                       capture_output=True, timeout=30)


# ---- issue 32: the key in bytes, the API's description behind it, Grad-CAM of a huge upload ----------------------

def test_a_key_that_cannot_travel_as_written_is_refused_at_start_up(tmp_path):
    from cxrlearn.errors import ConfigError
    from cxrlearn.serving.app import read_api_key

    for key in ("schlüssel-" + "k" * 16, "key with spaces " + "k" * 8, "ключ" * 5):
        (tmp_path / "key").write_text(key + "\n", encoding="utf-8")
        with pytest.raises(ConfigError, match="only printable ASCII"):
            read_api_key(tmp_path / "key")


def test_the_api_description_needs_the_key_too(keyed_server):
    url, _ = keyed_server
    for path in ("/docs", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(f"{url}{path}")
        assert refused.value.code == 401, path
        request = urllib.request.Request(f"{url}{path}", headers={"X-API-Key": "k" * 20 + "-secret"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, path


def test_a_huge_image_gets_its_heatmap_at_a_bounded_size(server, xray):
    from cxrlearn.serving import OVERLAY_MAX_SIDE

    url, _ = server
    huge = np.asarray(Image.fromarray(xray).resize((8000, 7900), Image.Resampling.NEAREST))
    data = _png(huge)
    assert len(data) < UPLOAD_LIMIT  # 63 million pixels, as the attack sent (decoded within the budget)
    status, body = _post(url, "huge.png", data, "?cam=top")
    assert status == 200, body
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["overlay_png"])))
    image = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["image_png"])))
    assert image.size == (OVERLAY_MAX_SIDE, round(7900 * OVERLAY_MAX_SIDE / 8000))
    assert overlay.width == OVERLAY_MAX_SIDE and overlay.height > image.height  # the caption below the picture


@pytest.fixture(scope="module")
def attacked_server(evaluated):
    yield from _run_service(evaluated[0], connections={"max_connections": 6, "header_timeout_s": 1.0,
                                                       "max_per_client": 4})


def test_a_sustained_attacker_cannot_shut_out_health_checks_or_clients(attacked_server):
    """An attacker on another address keeps 80 connections open, reopening each as soon as it is closed, half of them
    sending headers a byte at a time (slowloris), for 8 s; health checks and clients are answered throughout."""
    url, _ = attacked_server
    host, port = url.removeprefix("http://").split(":")
    stop, opened = threading.Event(), [0]

    def attacker(slow: bool):
        sockets = []
        while not stop.is_set():
            while len(sockets) < 40:
                try:
                    connection = socket.create_connection((host, int(port)), timeout=2,
                                                          source_address=("127.0.0.2", 0))
                except OSError:
                    break
                opened[0] += 1
                sockets.append(connection)
            for connection in list(sockets):
                try:
                    connection.sendall(b"G" if slow else b"")
                except OSError:  # closed by the service: reopened on the next pass
                    sockets.remove(connection)
                    connection.close()
            time.sleep(0.05)
        for connection in sockets:
            connection.close()

    threads = [threading.Thread(target=attacker, args=(slow,), daemon=True) for slow in (False, True)]
    for thread in threads:
        thread.start()
    answered = []
    try:
        time.sleep(0.5)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            answered.append(_get(f"{url}/healthz")[0])
            answered.append(_get(f"{url}/v1/model")[0])
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert opened[0] > 80  # the attacker did reopen what was closed
    assert len(answered) > 20 and set(answered) == {200}
