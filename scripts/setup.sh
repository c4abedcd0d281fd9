# Sourced by scripts/demo.sh and scripts/test.sh: makes the project's
# environment on a machine that has only python3 and pip.
#   - installs uv from PyPI if it is missing (into the user's site, or the
#     system site when running as root);
#   - creates .venv from uv.lock exactly (--locked: a stale lock is an error).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
    echo "setup: installing uv with pip" >&2
    if [ "$(id -u)" = 0 ]; then
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore uv
    else
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --user uv
    fi
fi
UV=("$PYTHON" -m uv)
# Never let uv fetch an interpreter of its own: use the machine's python3.
export UV_PYTHON_DOWNLOADS=never
"${UV[@]}" sync --locked --quiet --python "$PYTHON"
