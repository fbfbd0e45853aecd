#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): everything a lent GPU should measure, in one command.
#   bash bench/gpu_check.sh            # results under bench/results/<device>-<date>/
#   bash bench/gpu_check.sh --dry-run  # tiny sizes, any machine
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_check.py "$@"
