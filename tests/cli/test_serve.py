"""``speechtl serve``: the page, the API (the same JSON as the command), its limits, and the
page in a real browser (Debian's chromium, headless, driven by selenium)."""

import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from speechtl.cli.app import main

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from starlette.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def recognizer(trained_model):
    from speechtl.inference.recognizer import Recognizer

    return Recognizer.load(trained_model, device="cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory, speech_corpus):
    """Three clips joined with pauses, about 5 s: a file by a plain name, in its own folder."""
    from speechtl.data.audio import load_audio
    from speechtl.data.manifest import read_manifest

    wavs = [load_audio(u.audio) for u in read_manifest(speech_corpus)[:3]]
    pause = np.zeros(8000, np.float32)
    path = tmp_path_factory.mktemp("serve") / "talk.wav"
    sf.write(path, np.concatenate([x for w in wavs for x in (w, pause)]), 16000)
    return path


def _app(recognizer, **kw):
    from speechtl.cli.serve import make_app

    return make_app(recognizer, **kw)


def test_page_loads(recognizer):
    r = TestClient(_app(recognizer)).get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="file"' in r.text and 'id="record"' in r.text and "api/transcribe" in r.text
    assert "/*SERVER*/{}" not in r.text and '"max_upload_mb": 100' in r.text


def test_upload_answers_what_the_command_prints(tmp_path, recognizer, trained_model, clip, capsys, monkeypatch):
    monkeypatch.chdir(clip.parent)
    assert main(["transcribe", str(trained_model), clip.name, "--format", "json", "-q"]) == 0
    printed = capsys.readouterr().out
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    client = TestClient(_app(recognizer))
    r = client.post("/api/transcribe", files={"file": (clip.name, clip.read_bytes(), "audio/wav")})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.text == printed  # byte for byte
    assert json.loads(r.text)["segments"][0]["words"]
    srt = client.post("/api/transcribe", files={"file": (clip.name, clip.read_bytes())}, data={"format": "srt"})
    assert srt.status_code == 200 and srt.text.startswith("1\n00:00:")
    rendered = client.post("/api/render?format=srt", content=r.text, headers={"content-type": "application/json"})
    assert rendered.text == srt.text  # the page's download of what it was sent
    assert list(temp.iterdir()) == []  # every upload's folder removed


def test_limits_and_bad_uploads(tmp_path, recognizer, clip):
    client = TestClient(_app(recognizer, max_upload_bytes=10_000))
    big = clip.read_bytes()  # about 160 kB: refused on its declared length, before it is read
    r = client.post("/api/transcribe", files={"file": ("talk.wav", big)})
    assert r.status_code == 413 and "larger than this server takes (0.00953674 MB" in r.json()["error"]
    r = client.post("/api/transcribe", files={"file": ("talk.wav", big[:40_000])})  # counted while copied
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]
    client = TestClient(_app(recognizer))
    r = client.post("/api/transcribe", files={"file": ("notes.txt", b"not a sound at all\n" * 20)})
    assert r.status_code == 400 and r.json()["error"].startswith("notes.txt: not audio this server can read: ")
    r = client.post("/api/transcribe", files={"file": ("empty.wav", b"")})
    assert r.status_code == 400 and r.json()["error"] == "empty.wav: the upload is empty"
    r = client.post("/api/transcribe", files={"file": ("talk.wav", big)}, data={"format": "docx"})
    assert r.status_code == 400 and "format must be one of json, txt, srt, vtt" in r.json()["error"]
    r = client.post("/api/transcribe", files={"file": ("talk.wav", big)}, data={"lang": "cs"})
    assert r.status_code == 400 and "mode=adapter" in r.json()["error"]
    assert client.post("/api/transcribe").status_code == 422  # no file field


def test_requests_are_transcribed_one_at_a_time(recognizer, clip):
    busy, most = [0], [0]
    real = recognizer.transcriber

    def counting(**kw):
        tr = real(**kw)
        run = tr.run

        def one_at_a_time(items):
            busy[0] += 1
            most[0] = max(most[0], busy[0])
            time.sleep(0.2)
            try:
                yield from run(items)
            finally:
                busy[0] -= 1
        tr.run = one_at_a_time
        return tr

    recognizer.transcriber = counting
    try:
        client = TestClient(_app(recognizer))
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(client.post(
            "/api/transcribe", files={"file": (clip.name, clip.read_bytes())}).status_code)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del recognizer.transcriber
    assert codes == [200, 200, 200] and most[0] == 1


def test_serve_listens_on_localhost_by_default():
    from speechtl.cli.app import build_parser

    args = build_parser().parse_args(["serve", "model"])
    assert (args.host, args.port, args.vad) == ("127.0.0.1", 8000, "on")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_in_a_real_browser(tmp_path, recognizer, clip):
    """Upload a file, wait for the words, click one: the audio element moves to its time."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        pytest.skip("chromium and chromium-driver are not installed (tools/setup.sh installs them with apt-get)")
    webdriver = pytest.importorskip("selenium.webdriver")
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_app(recognizer), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1000,700",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    browser = None
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        browser = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_bin))
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "file").send_keys(str(clip))
        WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#transcript .w"))
        words = browser.find_elements(By.CSS_SELECTOR, "#transcript .w")
        target = words[len(words) // 2]
        start = float(target.get_attribute("data-start"))
        assert start > 0.5
        assert browser.execute_script("return document.getElementById('player').currentTime") == 0
        target.click()
        WebDriverWait(browser, 10).until(
            lambda b: b.execute_script("return document.getElementById('player').currentTime") >= start - 0.01)
        assert "words in" in browser.find_element(By.ID, "status").text
        assert not browser.find_element(By.ID, "downloads").get_attribute("hidden")
        shot = tmp_path / "serve.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 5000
        if os.environ.get("SPEECHTL_SCREENSHOT"):  # how docs/serve.png is made
            shutil.copy(shot, os.environ["SPEECHTL_SCREENSHOT"])
    finally:
        if browser is not None:
            browser.quit()
        server.should_exit = True
        thread.join(10)
