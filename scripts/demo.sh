#!/usr/bin/env bash
# The main job on the embedded default: sample CT and MR phantoms segmented by the bundled
# teachers and distilled students, with a comparison report in demo-output/ (or $1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
PYTHONPATH="$root/MedKDSegment" exec "$root/.venv/bin/python" -m MedKDSegmentLib demo --output "${1:-demo-output}" "${@:2}"
