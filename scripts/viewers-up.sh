#!/usr/bin/env bash
# viewers-up.sh -- what the tests of `cw top` and `cw dashboard` drive, from Debian's
# packages, installed when missing: tmux (cw top runs in a tmux pane) and chromium
# (the dashboard loads in headless Chromium), with a font for its screenshots.
# Idempotent: returns at once when both are there. Must run as root.
set -euo pipefail

missing=()
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "viewers-up: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v tmux >/dev/null && command -v chromium >/dev/null
