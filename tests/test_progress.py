"""Progress bars (progress=True): done, failed, total and the rate, on a real cluster."""

from __future__ import annotations

import re

import cw
import cw.client


def maybe_fail(x):
    if x % 5 == 0:
        raise ValueError(f"bad {x}")
    return x


def square(x):
    return x * x


def _final(err: str) -> str:
    """The bar's last drawing (tqdm redraws in place with carriage returns)."""
    return re.split(r"[\r\n]+", err.strip())[-1]


def test_gather_draws_done_failed_total_and_rate(master, workers, capsys):
    with cw.Client() as c:
        assert c.gather(c.map(square, range(10)), progress=True) == [x * x for x in range(10)]
        last = _final(capsys.readouterr().err)
        assert "10/10" in last and "0 failed" in last, last
        assert re.search(r"job/s|s/job", last), last
        futs = c.map(maybe_fail, range(1, 11))
        try:
            c.gather(futs, progress=True)
        except ValueError as e:
            assert str(e) == "bad 5"
        else:
            raise AssertionError("gather did not raise")
    # the bar stops where gather raised, and says that jobs failed (5, and maybe 10 already)
    last = _final(capsys.readouterr().err)
    assert int(re.search(r"(\d+) failed", last).group(1)) >= 1, last


def test_as_completed_counts_every_failure(master, workers, capsys):
    with cw.Client() as c:
        futs = c.map(maybe_fail, range(10))
        failed = sum(f.exception() is not None for f in cw.as_completed(futs, progress=True))
    assert failed == 2
    last = _final(capsys.readouterr().err)
    assert "10/10" in last and "2 failed" in last, last


def test_as_completed_and_map_draw_a_bar(master, workers, capsys):
    with cw.Client() as c:
        futs = c.map(square, range(20), progress=True)
        assert sorted(f.result() for f in cw.as_completed(futs, progress=True)) == [x * x for x in range(20)]
    err = capsys.readouterr().err
    assert err.count("20/20") >= 2, err  # map's bar and as_completed's bar
    assert "square" in err  # map names its bar after the function


def test_executor_map_progress_and_plain_map_unchanged(master, workers, capsys):
    with cw.Executor() as ex:
        assert list(ex.map(square, range(7))) == [x * x for x in range(7)]
        assert capsys.readouterr().err == ""  # no bar unless asked for
        assert list(ex.map(square, range(7), progress=True)) == [x * x for x in range(7)]
    assert "7/7" in capsys.readouterr().err


def test_client_thread_wait_progress_counts_failures(master, workers, capsys):
    got = []
    t = cw.client.ClientThread(lambda j, r: got.append(r))
    t.start()
    try:
        for i in range(10):
            t.submit(maybe_fail, i)
        assert t.wait(timeout=60, progress=True)
    finally:
        t.stop()
    assert len(got) == 10
    err = capsys.readouterr().err
    assert "10/10" in _final(err) and "2 failed" in _final(err), err
