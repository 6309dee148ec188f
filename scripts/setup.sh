#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv.
#   scripts/setup.sh          engine + demo (requirements.txt)
#   scripts/setup.sh --test   plus slicer-core, pytest and ruff (requirements-test.txt)
# Re-running is cheap: pip runs only when the requirements file changed since the last install.
# TORCH_INDEX_URL picks the torch build (README: "Choosing the torch build"), e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/requirements.txt"
[ "${1:-}" = "--test" ] && requirements="$root/requirements-test.txt"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating $venv ..." >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.installed-$(basename "$requirements" .txt)"
digest="$( (cat "$root"/requirements*.txt; echo "${TORCH_INDEX_URL:-}") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "Installing $(basename "$requirements") into .venv (first run takes a few minutes) ..." >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  if [ -n "${TORCH_INDEX_URL:-}" ]; then  # the pinned version, from the chosen build's index
    "$venv/bin/python" -m pip install --quiet "$(grep -m1 '^torch==' "$root/requirements.txt")" \
      --index-url "$TORCH_INDEX_URL" >&2
  fi
  "$venv/bin/python" -m pip install --quiet -r "$requirements" >&2
  "$venv/bin/python" -m pip install --quiet --no-deps -r "$root/requirements-nodeps.txt" >&2
  echo "$digest" > "$stamp"
fi
