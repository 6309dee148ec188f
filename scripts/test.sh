#!/usr/bin/env bash
# Set up the test environment, lint, and run the whole test suite (arguments go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" --test
cd "$root"
"$root/.venv/bin/ruff" check MedKDSegment Testing scripts
exec "$root/.venv/bin/python" -m pytest Testing "$@"
