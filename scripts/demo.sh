#!/usr/bin/env bash
# The main job on the embedded default: sample CT and MR phantoms segmented by the bundled
# teachers and distilled students, with a comparison report in demo-output/ (or $1); where the real
# data lie beside the project (../shared/data), also the bundled real brain student on the ITK head.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
head="$root/../shared/data/mr-brain-itk/t1_head.nii.gz"
extra=()
if [[ -f "$head" ]]; then extra=(--head "$head"); fi
PYTHONPATH="$root/MedKDSegment" exec "$root/.venv/bin/python" -m MedKDSegmentLib demo --output "${1:-demo-output}" \
    ${extra[@]+"${extra[@]}"} "${@:2}"
