#!/usr/bin/env bash
# test.sh -- install everything the tests need and run the whole suite:
#   the package with its test extra, a real single-node SLURM and Grid Engine
#   (scripts/clusters-up.sh, apt-get where missing; needs root or sudo), tmux and
#   chromium for the tests of `cw top` and `cw dashboard` (scripts/viewers-up.sh), lint, pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k slurm -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
if [ "$(id -u)" = 0 ]; then bash scripts/clusters-up.sh; else sudo -E bash scripts/clusters-up.sh; fi
if [ "$(id -u)" = 0 ]; then bash scripts/viewers-up.sh; else sudo -E bash scripts/viewers-up.sh; fi
"$PY" -m ruff check cw tests benchmarks examples
exec "$PY" -m pytest "$@"
