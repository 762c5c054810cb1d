"""The MLflow UI shows a pipeline's runs: a real ``mlflow server`` on the pipeline's SQLite store, its REST API for the
data, headless Chromium for what the pages show. Screenshots are kept in tests/artifacts/ (or $EPD_TEST_ARTIFACTS).

In CI (CI=true) a missing Chromium fails the test instead of skipping it.
"""
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from epd.cli import main

pytest.importorskip("mlflow")

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARTIFACTS = Path(os.environ.get("EPD_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
EXPERIMENT = "ui-check"


def _chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        message = "no chromium on PATH: the MLflow UI check needs it (.ci/setup installs Debian's chromium)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    return exe


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """A pipeline run with two sample stages (EPD table, DPM-Solver++(2M)) nested under it."""
    root = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        run_file = str(root / "run.json")
        assert main(["pipeline-run", "start", "--out", run_file, "--tracking-uri", f"sqlite:///{root}/mlruns/mlflow.db",
                     "--experiment", EXPERIMENT, "--run-name", "digits pipeline"]) == 0
        common = ["--seeds", "0-15", "--labels", "3", "--grid", "--parent-run", run_file, "--no-progress"]
        table = Path(__file__).parents[2] / "data" / "tables" / "epd-time_uniform-nfe5.json"
        assert main(["sample", "--table", str(table), "--outdir", str(root / "epd"),
                     "--run-name", "sample epd", *common]) == 0
        assert main(["sample", "--solver", "dpmpp_2m", "--nfe", "5", "--schedule", "time_uniform",
                     "--outdir", str(root / "dpmpp"), "--run-name", "sample dpmpp_2m", *common]) == 0
        assert main(["pipeline-run", "end", run_file]) == 0
    return {"root": root, **json.loads(Path(run_file).read_text())}


@pytest.fixture(scope="module")
def server(pipeline):
    """``mlflow server`` on a free port of 127.0.0.1 (no background job workers), stopped by its process id."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(pipeline["root"] / "server.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             pipeline["tracking_uri"], "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).read() == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{(pipeline['root'] / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # its own session: the server and the workers it spawned
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _search(url: str, experiment_id: str) -> list[dict]:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
    return [{"id": r["info"]["run_id"], "name": r["info"]["run_name"], "status": r["info"]["status"],
             "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])}} for r in runs]


def _page(url: str, screenshot: Path, tmp_path: Path, needles: list[str]) -> str:
    """The text Chromium shows at ``url`` once the app has rendered; a screenshot of it is kept."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    text = ""
    for budget in (30_000, 90_000):   # virtual time: the app's fetches finish first; a slow machine gets a 2nd go
        profile = tmp_path / f"profile-{budget}"
        dom = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget}", "--window-size=1400,1000",
             f"--screenshot={screenshot}", "--dump-dom", url],
            capture_output=True, text=True, timeout=300).stdout
        body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))
        if all(n in text for n in needles):
            break
    print(f"screenshot of {url}: {screenshot}")
    return text


def test_rest_api_lists_the_nested_runs(pipeline, server):
    runs = {r["name"]: r for r in _search(server, pipeline["experiment_id"])}
    assert sorted(runs) == ["digits pipeline", "sample dpmpp_2m", "sample epd"]
    assert all(r["status"] == "FINISHED" for r in runs.values())
    for name, solver in (("sample epd", "epd"), ("sample dpmpp_2m", "dpmpp_2m")):
        assert runs[name]["tags"]["mlflow.parentRunId"] == pipeline["run_id"]
        assert runs[name]["tags"]["solver"] == solver and runs[name]["tags"]["nfe"] == "5"


def test_ui_shows_the_pipeline_runs_side_by_side(pipeline, server, tmp_path):
    experiment = pipeline["experiment_id"]
    text = _page(f"{server}/#/experiments/{experiment}/runs", ARTIFACTS / "mlflow-runs.png", tmp_path,
                 ["digits pipeline"])
    assert EXPERIMENT in text and "digits pipeline" in text, text[:2000]
    assert re.search(r"\b3 matching runs", text), text[:2000]   # the pipeline run and its two nested stage runs

    children = [r["id"] for r in _search(server, experiment) if r["name"] != "digits pipeline"]
    compare = (f"{server}/#/compare-runs?runs={json.dumps(children, separators=(',', ':'))}"
               f"&experiments={json.dumps([experiment])}")
    text = _page(compare, ARTIFACTS / "mlflow-compare.png", tmp_path, ["sample epd", "sample dpmpp_2m"])
    assert "Comparing 2 Runs" in text, text[:2000]
    # One column per run: names, and the tags and params they are compared by.
    for needle in ("sample epd", "sample dpmpp_2m", "dpmpp_2m", "time_uniform", "epd-time_uniform-nfe5.json"):
        assert needle in text, f"{needle!r} not on the compare page: {text[:2000]}"

    for shot in ("mlflow-runs.png", "mlflow-compare.png"):
        img = Image.open(ARTIFACTS / shot).convert("L")
        lo, hi = img.getextrema()
        assert img.size == (1400, 1000) and hi - lo > 100, f"{shot} looks blank"
