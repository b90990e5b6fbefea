"""`cw dashboard` for real: a live cluster, the dashboard process, and Debian's headless chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
from clusters import IN_CI
from conftest import start_workers, wait_for

import cw

pytestmark = pytest.mark.timeout(240)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def work(x):
    time.sleep(0.05 + (x % 7) * 0.01)
    if x % 13 == 0:
        print(f"input {x} looks wrong", file=sys.stderr)
        raise ValueError(f"input {x} is not allowed")
    print(f"result {x}")
    return x


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile; fails the test (under CI) if it cannot start."""
    exe = shutil.which("chromium")
    if exe is None:
        msg = "chromium is not installed: bash scripts/test.sh installs it (apt-get install chromium)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    with tempfile.TemporaryDirectory(prefix="cw-chromium-") as profile:
        p = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if p.returncode != 0:
        pytest.fail(f"chromium failed ({p.returncode}): {p.stderr[-2000:]}")
    return p


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def load(master, procs):
    """Two workers of two slots, and a client submitting jobs (a few fail) until the test ends."""
    start_workers(procs, 2, "--procs", "2")
    stop = threading.Event()
    futures: list = []

    def submit() -> None:
        with cw.Client(run="sweep-1") as c:
            i = 0
            while not stop.is_set():
                futures.extend(c.submit(work, i + k) for k in range(10))
                i += 10
                stop.wait(0.25)
            cw.client.futures.cf.wait(futures, timeout=60)

    t = threading.Thread(target=submit, daemon=True)
    t.start()
    yield futures
    stop.set()
    t.join(90)


def test_dashboard_draws_live_charts_in_chromium_and_refuses_without_the_token(master, procs, load, tmp_path):
    dash = procs.start("dash", "-m", "cw", "dashboard", "--port", "0", "--interval", "0.5")
    url = wait_for(lambda: (re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", procs.log("dash")) or [None])[0],
                   timeout=30, what="the dashboard's URL")  # fmt: skip
    assert dash.poll() is None
    base, token = url.split("?token=")
    # without the token (or with a wrong one): no page and no data
    for path in ("", "api/snapshot", "api/failures", "job/1", "static/dashboard.js", "static/uplot/uPlot.iife.min.js"):
        for suffix in ("", "?token=wrong" + token[:5]):
            status, body = get(base + path + suffix)
            assert status == 403 and "sweep-1" not in body and "ValueError" not in body, (path, status)
    # with it: the page, whose links are all relative (it works through ssh -L)
    status, page = get(url)
    assert status == 200 and "static/uplot/uPlot.iife.min.js" in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN, no host names
    wait_for(lambda: len(__import__("json").loads(get(f"{base}api/snapshot?token={token}")[1])["series"]["t"]) >= 6
             and any(f.done() for f in load), timeout=60, what="the dashboard's samples")  # fmt: skip

    def dom() -> str:
        return chromium("--virtual-time-budget=4000", "--dump-dom", url).stdout

    first = dom()
    assert 'class="uplot' in first, first[:2000]  # the charts were built
    points = int(re.search(r'data-points="(\d+)"', first).group(1))
    assert points >= 5
    assert float(re.search(r'data-max-done="([\d.]+)"', first).group(1)) > 0  # jobs done per second
    assert float(re.search(r'data-max-workers="([\d.]+)"', first).group(1)) == 2
    assert 'data-run="sweep-1"' in first
    assert first.count("2/2") + first.count("1/2") + first.count("0/2") >= 2  # both workers listed
    wait_for(lambda: any(f.done() and f.exception() for f in list(load)), timeout=60, what="a failure")
    time.sleep(2)
    later = dom()
    assert int(re.search(r'data-points="(\d+)"', later).group(1)) > points  # live: more samples
    assert "is not allowed" in later and "looks wrong" in later  # a failure, its traceback and stderr
    shot = tmp_path / "dashboard.png"
    chromium("--window-size=1400,1100", "--virtual-time-budget=4000", f"--screenshot={shot}", url)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000  # a drawn page, not a blank one
    # a failed job's page: arguments, attempts with worker and timings, traceback, its own stderr
    failed = re.search(r'data-job="(\d+)"', later).group(1)
    job = chromium("--dump-dom", f"{base}job/{failed}?token={token}").stdout
    assert "work" in job and "ValueError" in job and "looks wrong" in job and "attempts" in job
    assert re.search(r"<td>1</td><td>[^<]+:[0-9a-f]{4}</td><td>error</td>", job), job


def test_two_dashboards_on_one_host_keep_their_own_cookie(cw_home):
    """A browser keeps cookies by host, not port: two dashboards (two clusters, or two
    tunnels to one laptop) must not overwrite each other's, or the first page's polls fail."""
    import http.cookiejar

    from cw.dashboard import Dashboard
    from cw.discovery import ClusterDir

    boards = []
    for name in ("a", "b"):
        cluster = ClusterDir(name=name)
        cluster.make()
        boards.append(Dashboard(cluster, port=0).start())
    try:
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

        def status(url: str) -> int:
            try:
                with browser.open(url, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        a, b = boards
        base_a = a.url.split("?")[0]
        assert status(a.url) == 200 and status(base_a + "api/snapshot") == 200
        assert status(b.url) == 200
        assert status(base_a + "api/snapshot") == 200  # a's page still polls
        assert status(b.url.split("?")[0] + "api/snapshot") == 200
        assert status(f"http://127.0.0.1:{b.port}/api/snapshot?token={a.token}") == 403  # tokens are not shared
    finally:
        for d in boards:
            d.stop()
