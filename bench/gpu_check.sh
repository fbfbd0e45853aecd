#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): everything a lent GPU should measure, in one command.
#   bash bench/gpu_check.sh            # results under bench/results/<device>-<date>/
#   bash bench/gpu_check.sh --dry-run  # tiny sizes, any machine
# Run from any directory: a relative --out is the caller's (a `cd` into the checkout made it the checkout's).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python "$root/bench/gpu_check.py" "$@"
