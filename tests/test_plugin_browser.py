"""The lineage page in a real headless Chromium, served by a real ``mlflow server --app-name
genopt`` on loopback, over a SQLite store holding two scripted learning loops: one tracked
straight into the database (file artifacts), one tracked through the server's REST API
(proxied ``mlflow-artifacts:/`` artifacts).

Chromium comes from the system (Debian's ``chromium`` package, which ``scripts/test.sh``
installs when it runs as root); Playwright drives it without downloading a browser. The test
skips, saying why, only when no Chromium is installed or it cannot start. Set
``GENOPT_SCREENSHOT=/tmp/lineage.png`` to keep a screenshot of the lineage page.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from test_plugin import IMPROVED, scripted_bbeh_loop

pytestmark = pytest.mark.timeout(600)

SERVER_START_TIMEOUT_S = 180  # a cold `mlflow server` takes ~30 s on 2 cores
PAGE_TIMEOUT_MS = 30_000
MLFLOW_UI_TIMEOUT_MS = 90_000  # the MLflow UI's React bundle is large
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
OTHER_PROMPT = "Compute carefully, step by step.\n{question}\nEnd with: The answer is <answer>."


def find_chromium() -> str | None:
    override = os.environ.get("GENOPT_CHROMIUM")
    if override:
        return override
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not up after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """End the server's process group (the `mlflow` CLI and the uvicorn it started)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lineage-server")
    db_uri = f"sqlite:///{folder}/mlflow.db"
    loop_a = scripted_bbeh_loop(db_uri, run_name="loop-a")  # straight into the database
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "genopt",
             "--backend-store-uri", db_uri, "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_server(url, process, log)
        # the second loop goes through the server: REST API and proxied artifacts
        loop_b = scripted_bbeh_loop(url, experiment="genopt-http", steps=2, seed=1,
                                    improved=OTHER_PROMPT, run_name="loop-b")
        client = MlflowClient(db_uri)
        runs = {r.info.run_name: r for e in ("genopt", "genopt-http")
                for r in client.search_runs([client.get_experiment_by_name(e).experiment_id])}
        yield {"url": url, "loops": {"loop-a": loop_a, "loop-b": loop_b}, "runs": runs,
               "log": log}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium installed (apt-get install chromium; scripts/test.sh does it "
                    "as root), or set GENOPT_CHROMIUM=/path/to/chromium")
    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS,
                                                  timeout=60_000)
        except PlaywrightError as exc:
            pytest.skip(f"Chromium at {chromium} could not start: {str(exc).splitlines()[0]}")
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.set_default_navigation_timeout(PAGE_TIMEOUT_MS)
    yield page
    context.close()


def version_ids(result, status):
    return [v.version.version_id for v in result.versions if v.status == status]


def test_open_a_loop_click_a_version_and_see_its_diff_context_and_reasoning(page, server):
    from playwright.sync_api import expect

    loop = server["loops"]["loop-a"]
    run = server["runs"]["loop-a"]
    page.goto(f"{server['url']}/genopt/")
    expect(page.get_by_test_id("loop-runs")).to_contain_text("loop-b")
    page.get_by_role("link", name="loop-a", exact=True).click()
    page.wait_for_url(f"**/genopt/runs/{run.info.run_id}")

    tree = page.get_by_test_id("version-tree")
    expect(tree.locator("a.node")).to_have_count(len(loop.versions))
    selected = loop.selected.version_id
    expect(tree.locator(f'a.node[data-version="{selected}"]')).to_contain_text("selected")
    # the selected version opens by default, diffed against its parent
    expect(page.get_by_test_id("detail-version")).to_have_text(selected)
    expect(page.get_by_test_id("diff")).to_contain_text("+Compute carefully.")
    if server.get("screenshot") is None:
        server["screenshot"] = Path(os.environ.get("GENOPT_SCREENSHOT")
                                    or server["log"].with_name("lineage.png"))
        page.screenshot(path=str(server["screenshot"]), full_page=True)

    # click the rejected candidate: its diff, the optimizer's reasoning, the learning context
    (rejected,) = version_ids(loop, "rejected")
    tree.locator(f'a.node[data-version="{rejected}"]').click()
    expect(page.get_by_test_id("detail-version")).to_have_text(rejected)
    expect(page.get_by_test_id("diff")).to_contain_text("+Be brief.")
    expect(page.get_by_test_id("diff")).to_contain_text(f"--- {selected}/prompt")
    expect(page.get_by_test_id("reasoning")).to_have_text("shorter is better")
    context = page.get_by_test_id("context")
    expect(context).to_contain_text("# Objective")
    expect(context).to_contain_text("Compute carefully.")  # the then-current prompt it was shown

    # diff against any other version: picking one in the select reloads the page
    (initial,) = version_ids(loop, "initial")
    page.get_by_test_id("against").select_option(initial)
    page.wait_for_url(f"**against={initial}")
    expect(page.get_by_test_id("diff")).to_contain_text(f"--- {initial}/prompt")

    # an invalid proposal has no version; its step says why it was refused
    page.get_by_test_id("steps").get_by_role("link", name="1", exact=True).click()
    expect(page.get_by_test_id("invalid-reason")).to_contain_text("answer is not JSON")


def test_loop_tracked_through_the_server_reads_its_proxied_artifacts(page, server):
    from playwright.sync_api import expect

    run = server["runs"]["loop-b"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    page.goto(f"{server['url']}/genopt/runs/{run.info.run_id}")
    expect(page.get_by_test_id("detail-version")).to_have_text(
        server["loops"]["loop-b"].selected.version_id)
    expect(page.get_by_test_id("diff")).to_contain_text("+Compute carefully, step by step.")
    expect(page.get_by_test_id("context")).to_contain_text("# Objective")


def test_compare_two_loops_best_versions(page, server):
    from playwright.sync_api import expect

    page.goto(f"{server['url']}/genopt/")
    ids = {name: r.info.run_id for name, r in server["runs"].items()}
    page.locator('select[name="a"]').select_option(ids["loop-a"])
    page.locator('select[name="b"]').select_option(ids["loop-b"])
    page.get_by_role("button", name="Compare best versions").click()
    page.wait_for_url("**/genopt/compare?**")
    table = page.get_by_test_id("compare")
    expect(table).to_contain_text("loop-a")
    expect(table).to_contain_text("loop-b")
    diff = page.get_by_test_id("diff")
    expect(diff).to_contain_text("-Compute carefully.")
    expect(diff).to_contain_text("+Compute carefully, step by step.")
    assert IMPROVED.splitlines()[0] == "Compute carefully."


def test_the_page_links_to_the_run_in_the_mlflow_ui_served_alongside(page, server):
    from playwright.sync_api import expect

    run = server["runs"]["loop-a"]
    page.goto(f"{server['url']}/genopt/runs/{run.info.run_id}")
    page.get_by_test_id("mlflow-run-link").click()
    page.wait_for_url(f"**/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}**")
    # MLflow's own React UI renders the run: the same server serves both
    expect(page.get_by_text("loop-a").first).to_be_visible(timeout=MLFLOW_UI_TIMEOUT_MS)
