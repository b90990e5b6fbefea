"""A sweep of a program over its parameters: one shell-command job per point.

    python examples/shell_sweep.py          # again: only what has not succeeded runs

Each run of the program gets a scratch directory of its own on the worker's
disk (wiped after it), and the files it leaves matching ``*.csv`` are archived
under the run and the job's key: ``cw pull shell-sweep results/`` fetches them.
"""

import sys

import cw

# Stands for a compiled solver: reads its parameters, writes a table.
PROGRAM = r"""
import sys
alpha, beta = float(sys.argv[1]), float(sys.argv[2])
loss = (alpha - 0.3) ** 2 + (beta - 2.0) ** 2
with open("result.csv", "w") as f:
    f.write(f"alpha,beta,loss\n{alpha},{beta},{loss}\n")
print(f"loss={loss:.4f}")
"""


def main():
    points = [(a / 10, b / 2) for a in range(6) for b in range(6)]
    with cw.Client(run="shell-sweep") as client:
        futures = {
            client.submit_shell([sys.executable, "-c", PROGRAM, str(a), str(b)], scratch=True,
                                outputs=["*.csv"], key=f"a={a},b={b}", timeout=60): (a, b)
            for a, b in points
        }
        best = None
        for f in cw.as_completed(futures):
            done = f.result()  # a cw.CompletedCommand: returncode, stdout, stderr, host, runtime
            loss = float(done.stdout.split("=")[1])
            if best is None or loss < best[0]:
                best = (loss, futures[f], done.host)
        print(f"{len(points)} runs; the best: loss {best[0]:.4f} at alpha, beta = {best[1]} (ran on {best[2]})")
        try:  # a failing program raises cw.CommandError, with its exit code and stderr tail
            client.submit_shell("echo 'no such mesh' >&2; exit 2").result()
        except cw.CommandError as e:
            print(f"a failing command: {e}")
    print("its tables: cw pull shell-sweep results/ --cluster local;  the joblog: cw results shell-sweep --cluster local")


if __name__ == "__main__":
    main()
