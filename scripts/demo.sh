#!/usr/bin/env bash
# Runs `tunnelctl demo` (everything on loopback); extra arguments go to it,
# e.g. `scripts/demo.sh --once`.
source "$(dirname "$0")/setup.sh"
exec "${UV[@]}" run --locked --no-sync tunnelctl demo "$@"
