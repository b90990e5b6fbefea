"""`cw dashboard`: a web page with live charts, runs, workers, failures and a page per job.

A process of its own (Flask, served by werkzeug's threaded server): a thread
asks the master for its status once per refresh (one signed STATUS request,
whatever the number of browsers) and reads the store read-only, so the page
never slows the master's loop. Everything it serves is in this package (the
charts are uPlot, shipped in ``static/``): it works on a cluster with no
internet. It binds 127.0.0.1 by default and answers nothing, not even the
page, without the token printed in its URL (a login node is shared): the
first request carries it as ``?token=``, and a cookie carries it after that
(named after the token: browsers keep cookies by host, not by port, and two
dashboards on one host must not overwrite each other's).
The URL holds no host name, so it works through ``ssh -L``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from pathlib import Path
from typing import Any, Callable

from ..cli.views import Watcher, duration, size
from ..discovery import ClusterDir
from ..errors import CwError, StoreError
from ..store.reader import StoreReader

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "cw_dashboard_"  # followed by a digest of the token: one cookie per dashboard


def cookie_name(token: str) -> str:
    """The name of this dashboard's cookie: another dashboard on the same host has another."""
    return COOKIE + hashlib.sha256(token.encode()).hexdigest()[:16]


class Sampler(threading.Thread):
    """Refreshes the snapshot every ``interval`` seconds; pages read the latest one."""

    def __init__(self, watcher: Watcher, interval: float):
        super().__init__(name="cw-dashboard-sampler", daemon=True)
        self.watcher, self.interval = watcher, interval
        self.latest: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.sample()

    def sample(self) -> None:
        try:
            snap = self.watcher.snapshot()
            snap["series"] = self.watcher.series()
        except Exception as e:  # never let one bad sample stop the page
            log.warning("dashboard: cannot read the cluster: %s", e)
            return
        with self.lock:
            self.latest = snap

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.sample()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return self.latest


def create_app(cluster: ClusterDir, token: str, sampler: Sampler) -> Any:
    """The Flask application: pages and JSON, every one behind the token."""
    from flask import Flask, abort, jsonify, make_response, render_template, request

    app = Flask(__name__, static_folder=str(HERE / "static"), template_folder=str(HERE / "templates"))
    app.jinja_env.filters.update(duration=duration, size=size, when=_when)
    cookie = cookie_name(token)

    @app.before_request
    def check_token() -> Any:
        given = request.args.get("token") or request.cookies.get(cookie) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403)

    @app.after_request
    def remember_token(resp: Any) -> Any:
        if request.args.get("token"):
            resp.set_cookie(cookie, token, httponly=True, samesite="Strict")
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"  # the token never leaves in a Referer
        return resp

    @app.errorhandler(403)
    def forbidden(_e: Any) -> Any:
        return make_response("forbidden: open the URL that `cw dashboard` printed (it carries the token)\n",
                             403, {"Content-Type": "text/plain"})  # fmt: skip

    @app.route("/")
    def index() -> Any:
        return render_template("index.html", cluster=str(cluster.path))

    @app.route("/api/snapshot")
    def api_snapshot() -> Any:
        return jsonify(sampler.snapshot())

    @app.route("/job/<int:jid>")
    def job_page(jid: int) -> Any:
        job = _job(cluster, jid)
        if job is None:
            abort(404)
        return render_template("job.html", job=job, cluster=str(cluster.path))

    @app.route("/api/job/<int:jid>")
    def api_job(jid: int) -> Any:
        job = _job(cluster, jid)
        return jsonify(job) if job is not None else (jsonify({"error": f"no job {jid}"}), 404)

    @app.route("/api/failures")
    def api_failures() -> Any:
        n, tail = min(int(request.args.get("n", 20)), 200), min(int(request.args.get("tail", 4000)), 1 << 20)
        return jsonify(_read(cluster, lambda r: r.failures(n, tail=tail), []))

    return app


def _read(cluster: ClusterDir, verb: Callable[[StoreReader], Any], default: Any) -> Any:
    if not cluster.store_path.exists():
        return default
    try:
        with StoreReader(cluster.store_path) as r:
            return verb(r)
    except StoreError as e:
        log.warning("dashboard: %s", e)
        return default


def _job(cluster: ClusterDir, jid: int) -> dict | None:
    job = _read(cluster, lambda r: r.job(jid), None)
    if job is not None:
        for a in job["attempts"]:
            a["waited"] = None if a["started"] is None or a["queued"] is None else max(0.0, a["started"] - a["queued"])
            a["ran"] = None if a["started"] is None or a["ended"] is None else max(0.0, a["ended"] - a["started"])
    return job


def _when(t: float | None) -> str:
    import datetime

    return "-" if t is None else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


class Dashboard:
    """The dashboard's server: ``start()`` serves in a thread, ``url`` has the token, ``stop()``."""

    def __init__(self, cluster: ClusterDir, bind: str = "127.0.0.1", port: int = 8787,
                 interval: float = 1.0, token: str | None = None, address: str | None = None):  # fmt: skip
        from werkzeug.serving import make_server

        self.token = token or secrets.token_urlsafe(24)
        self.sampler = Sampler(Watcher(cluster, address), interval)
        app = create_app(cluster, self.token, self.sampler)
        try:
            self.server = make_server(bind, port, app, threaded=True)
        except OSError as e:
            if port == 0:
                raise CwError(f"cannot serve the dashboard on {bind}: {e}") from None
            log.info("port %d is taken (%s): taking a free one", port, e)
            self.server = make_server(bind, 0, app, threaded=True)
        self.bind, self.port = bind, self.server.server_port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind in ("127.0.0.1", "0.0.0.0", "") else self.bind
        return f"http://{host}:{self.port}/?token={self.token}"

    def serve_forever(self) -> None:
        self.sampler.start()
        try:
            self.server.serve_forever()
        finally:
            self.sampler.halt.set()

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self.serve_forever, name="cw-dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.sampler.halt.set()

