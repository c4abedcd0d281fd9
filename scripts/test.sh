#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy --strict), unit and
# end-to-end tests (pytest). Extra arguments go to pytest.
source "$(dirname "$0")/setup.sh"
echo "== ruff" >&2
"${UV[@]}" run --locked --no-sync ruff check .
"${UV[@]}" run --locked --no-sync ruff format --check .
echo "== mypy --strict" >&2
"${UV[@]}" run --locked --no-sync mypy
echo "== pytest" >&2
exec "${UV[@]}" run --locked --no-sync pytest "$@"
