#!/usr/bin/env bash
# Installs the Debian packages that the end-to-end tests drive as real,
# independent programs: nginx (the web server behind the tunnel), curl (the
# client in front of it), coturn (the STUN/TURN server of tests/e2e/test_turn.py
# and of the NAT lab, scripts/natlab), iptables (the NAT routers), iproute2
# (`ip netns`) and util-linux (`prlimit`: the signaling server under a low
# descriptor limit, tests/e2e/test_signaling_flood.py), chromium (the browser
# client's tests, driven by Playwright's Python client: no browser download),
# redis-server (the signaling cluster's shared state) and OpenSSH (ssh through
# `connect --stdio`). scripts/test.sh calls it before pytest.
#
#   install-system-deps.sh
#
# Idempotent: when every program is already on PATH it does nothing at all (no
# apt-get update). Otherwise it needs root (as CI runs): `apt-get update`, then a
# non-interactive `apt-get install` of what is missing. Not root and something
# missing: one line saying what and how, exit 1 (the tests that need it then
# skip, naming the binary, so a developer without root still gets a green run).
#
# `nginx` is the package with the server binary on Debian 12 and later
# (`nginx-light` on Debian 12 only adds the echo module, which the tests do not
# use). Installing it never starts a system nginx on port 80, nor coturn on
# 3478: while apt runs, a temporary policy-rc.d refuses service starts (unless
# the machine has one).
set -euo pipefail

# program on PATH -> Debian package that provides it
declare -A PACKAGE_OF=([nginx]=nginx [curl]=curl [turnserver]=coturn [iptables]=iptables [ip]=iproute2 [prlimit]=util-linux
    [chromium]=chromium [redis-server]=redis-server [sshd]=openssh-server [ssh]=openssh-client [scp]=openssh-client)

# Debian puts nginx, iptables and ip in /usr/sbin, which a non-root PATH may lack.
PATH="$PATH:/usr/sbin:/sbin"

missing=()
for program in "${!PACKAGE_OF[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$program]}")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: missing ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]}); the tests that need them will be skipped" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    trap 'rm -f "$policy"' EXIT
    printf '#!/bin/sh\n# temporary, from tunnelctl scripts/install-system-deps.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
fi

echo "install-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for program in "${!PACKAGE_OF[@]}"; do
    command -v "$program" >/dev/null 2>&1 || {
        echo "install-system-deps: $program is still missing after installing ${missing[*]}" >&2
        exit 1
    }
done
