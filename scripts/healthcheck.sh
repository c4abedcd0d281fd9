#!/usr/bin/env bash
# Health check for a tunnelctl supervisor, for systemd timers, Docker HEALTHCHECK,
# monitoring agents. Built on `tunnelctl status --json` (README, "Supervisor JSON").
#
#   healthcheck.sh [--runtime-dir DIR] [--min-devices-up N]
#
#   --runtime-dir DIR     the supervisor's runtime directory (default: tunnelctl's,
#                         i.e. $TUNNEL_RUNTIME_DIR, else $XDG_RUNTIME_DIR/tunnelctl)
#   --min-devices-up N    how many devices must have their signaling link up (default 1)
#
# Prints one line saying why, and exits:
#   0  healthy: running, at least N devices with "link": "up", none "fatal"
#   1  unhealthy: fewer than N devices up, or a device is "fatal" (its token was
#      refused, say); the supervisor runs but cannot serve everything
#   2  not running: `tunnelctl status` failed (no supervisor, no answer, wrong
#      runtime directory), or its output could not be read ("unknown: ...")
#   3  usage error
#
# Environment: TUNNELCTL, the tunnelctl executable (default `tunnelctl` on PATH,
# e.g. /opt/tunnelctl/.venv/bin/tunnelctl); HEALTHCHECK_TIMEOUT, seconds before
# giving up on it (default 15). Needs bash and python3 (for the JSON; no jq).
set -uo pipefail

usage() {
    sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"
}

usage_error() {
    echo "healthcheck: $1 (see --help)" >&2
    exit 3
}

runtime_dir=""
min_up=1
while (($#)); do
    case $1 in
        --runtime-dir)
            (($# >= 2)) || usage_error "--runtime-dir needs a directory"
            runtime_dir=$2
            shift 2
            ;;
        --runtime-dir=*)
            runtime_dir=${1#*=}
            shift
            ;;
        --min-devices-up)
            (($# >= 2)) || usage_error "--min-devices-up needs a number"
            min_up=$2
            shift 2
            ;;
        --min-devices-up=*)
            min_up=${1#*=}
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage_error "unknown argument: $1"
            ;;
    esac
done
[[ $min_up =~ ^[0-9]+$ ]] || usage_error "--min-devices-up must be a whole number, got '$min_up'"
timeout_s=${HEALTHCHECK_TIMEOUT:-15}
[[ $timeout_s =~ ^[0-9]+$ ]] && ((timeout_s > 0)) ||
    usage_error "HEALTHCHECK_TIMEOUT must be a whole number of seconds, got '$timeout_s'"

# tunnelctl's --runtime-dir option reads this variable; the systemd unit sets it.
if [[ -n $runtime_dir ]]; then
    export TUNNEL_RUNTIME_DIR=$runtime_dir
fi

errors=$(mktemp "${TMPDIR:-/tmp}/healthcheck.XXXXXX") || {
    echo "unknown: cannot create a temporary file"
    exit 2
}
trap 'rm -f "$errors"' EXIT

tunnelctl=${TUNNELCTL:-tunnelctl}
if ! command -v "$tunnelctl" >/dev/null; then
    echo "not running: cannot run $tunnelctl (not found; set TUNNELCTL)"
    exit 2
fi
limit=()
if command -v timeout >/dev/null; then
    limit=(timeout "$timeout_s")
fi
status_json=$("${limit[@]}" "$tunnelctl" status --json 2>"$errors")
rc=$?
if ((rc != 0)); then
    if ((rc == 124)) && ((${#limit[@]})); then
        reason="tunnelctl status gave no answer within $timeout_s s"
    else
        # The last line tunnelctl printed is its one-line error ("tunnelctl: error: ...").
        reason=$(grep -v '^[[:space:]]*$' "$errors" | tail -n 1)
        reason=${reason#tunnelctl: error: }
    fi
    echo "not running: ${reason:-tunnelctl status exited with $rc}"
    exit 2
fi

# -I: isolated mode, so nothing in the current directory or PYTHON* can interfere.
# shellcheck disable=SC2016  # the program is Python, not shell
python3 -I -c '
import json
import sys

min_up = int(sys.argv[1])


def say(code, line):
    print(" ".join(line.split()))  # always exactly one line
    sys.exit(code)


try:
    status = json.loads(sys.stdin.read())
    devices = [(str(d["id"]), str(d["link"]), str(d["state"])) for d in status["devices"]]
    sessions = int(status["sessions"])
    pid = int(status["pid"])
    state = str(status["state"])
except (ValueError, KeyError, TypeError) as exc:
    say(2, f"unknown: unreadable status JSON ({type(exc).__name__}: {exc})")

up = [device for device, link, _ in devices if link == "up"]
summary = f"{len(up)}/{len(devices)} devices up"
fatal = [device for device, _, health in devices if health == "fatal"]
if fatal:
    names = ", ".join(fatal)
    say(1, f"unhealthy: device {names} fatal; {summary}")
if len(up) < min_up:
    down = ", ".join(f"{device} {link}" for device, link, _ in devices if link != "up")
    say(1, f"unhealthy: {summary}, need {min_up}" + (f" ({down})" if down else ""))
say(0, f"ok: {summary}, {sessions} sessions, supervisor pid {pid} {state}")
' "$min_up" <<<"$status_json"
rc=$?
if ((rc > 2)); then # python3 missing or broken: we cannot tell
    echo "unknown: cannot check the status JSON (python3 exited with $rc)"
    exit 2
fi
exit "$rc"
