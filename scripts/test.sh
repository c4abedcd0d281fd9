#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy --strict), unit and
# end-to-end tests (pytest). Extra arguments go to pytest.
source "$(dirname "$0")/setup.sh"
# System packages some end-to-end tests need (nginx, curl). Installed when
# missing and we are root (CI is); otherwise those tests skip with a reason.
if [ "$(id -u)" = 0 ]; then
    bash scripts/install-system-deps.sh
else
    bash scripts/install-system-deps.sh || echo "test: some system packages are missing; the tests that need them will skip" >&2
fi
echo "== ruff" >&2
"${UV[@]}" run --locked --no-sync ruff check .
"${UV[@]}" run --locked --no-sync ruff format --check .
echo "== mypy --strict" >&2
"${UV[@]}" run --locked --no-sync mypy
echo "== pytest" >&2
exec "${UV[@]}" run --locked --no-sync pytest "$@"
