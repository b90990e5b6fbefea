"""cw in one minute: no cluster needed, the same code runs on SLURM or Grid Engine.

    python examples/demo.py
"""

import os
import random
import time

import cw


def darts(n, seed):
    """Throw n darts at the unit square; count those inside the quarter circle."""
    print(f"throwing {n} darts with seed {seed}")  # kept with the job: future.stdout(), cw logs
    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(n))


def main():
    # No master is configured, so this starts an embedded local cluster
    # (a master and one worker per CPU) and stops it at the end of the block.
    with cw.Client(run="demo-pi") as client:
        t = time.perf_counter()
        futures = client.map(darts, [200_000] * 40, range(40))
        inside = sum(f.result() for f in cw.as_completed(futures, progress=True))
        pi = 4 * inside / (200_000 * 40)
        print(f"pi ~ {pi:.5f} from 8,000,000 darts in 40 jobs, {time.perf_counter() - t:.2f} s")

        # A job's exception comes back with the remote traceback attached.
        try:
            client.submit(darts, "many", 0).result()
        except TypeError as e:
            print(f"a failing job raised here: {type(e).__name__}: {e}")
        print(f"what job 0 printed: {futures[0].stdout()!r}")

    # The original Cluster-Workers API: a callback per finished job.
    def my_callback(jobid, result):
        print(f"  job {jobid} completed: {result}")

    thread = cw.ClientThread(my_callback)
    thread.start()
    for seed in range(3):
        thread.submit(darts, 1000, seed)
    thread.wait()
    thread.stop()
    store = os.path.join(os.path.expanduser(os.environ.get("CW_HOME", "~/.cw")), "local", "cw.sqlite")
    print(f"done; every job and result is in {store}")
    print("try: cw status --cluster local;  cw results demo-pi --cluster local;"
          "  cw logs demo-pi --cluster local;  or run me again")


if __name__ == "__main__":
    main()
