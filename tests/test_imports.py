"""The import rules of ARCHITECTURE.md, checked on the source."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aio", "harness", "protocol", "signaling", "supervisor", "workers", "tunnelctl")
FORBIDDEN = {
    # The process harness is shared by the CLI, the scripts and the tests: it
    # may import none of our packages, so that importing it imports no tunnelctl.
    "harness": set(PACKAGES) - {"harness"},
    "aio": {"protocol", "signaling", "supervisor", "workers", "tunnelctl", "aiortc", "zmq"},
    "protocol": {"signaling", "supervisor", "workers", "tunnelctl", "aiortc", "websockets", "zmq"},
    "signaling": {"supervisor", "workers", "tunnelctl", "aiortc"},
    "supervisor": {"workers", "tunnelctl", "aiortc", "aioice"},
    "workers": {"supervisor", "signaling", "tunnelctl"},
}
#: The client end of signaling is shared by the device side (supervisor) and the
#: client side (workers); the server is imported by neither.
SHARED_CLIENT_END = frozenset({"signaling.link", "signaling.errors", "signaling.discovery"})


def imported_roots(path: Path, allowed: frozenset[str] = frozenset()) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        roots |= {name.split(".")[0] for name in names if name not in allowed}
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_rules(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        allowed = SHARED_CLIENT_END if package in ("workers", "supervisor") else frozenset()
        bad = imported_roots(path, allowed) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_nothing_imports_the_cli() -> None:
    for package in PACKAGES[:-1]:
        for path in (ROOT / package).rglob("*.py"):
            assert "tunnelctl" not in imported_roots(path), path


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_scripts_do_not_import_the_cli(script: str) -> None:
    """Scripts are clients of the packages, like the CLI, never of the CLI."""
    bad = imported_roots(ROOT / "scripts" / script) & {"tunnelctl"}
    assert not bad, f"scripts/{script} imports {sorted(bad)}"


def test_the_harness_imports_only_the_standard_library() -> None:
    for path in sorted((ROOT / "harness").rglob("*.py")):
        outside = imported_roots(path) - set(sys.stdlib_module_names) - {"harness"}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_every_package_is_typed() -> None:
    for package in PACKAGES:
        assert (ROOT / package / "py.typed").exists(), package


#: The supervisor's sans-I/O core (ARCHITECTURE.md: a pure core and a thin shell).
SUPERVISOR_CORE = (
    "core",
    "pool",
    "sessions",
    "events",
    "commands",
    "worker_messages",
    "signal_messages",
)
IO_MODULES = {"asyncio", "zmq", "os", "time", "subprocess", "signal", "socket", "selectors"}


@pytest.mark.parametrize("module", SUPERVISOR_CORE)
def test_the_supervisor_core_does_no_io(module: str) -> None:
    path = ROOT / "supervisor" / f"{module}.py"
    bad = imported_roots(path) & IO_MODULES
    assert not bad, f"supervisor/{module}.py imports {sorted(bad)}"


def test_the_supervisor_core_loads_no_io_library() -> None:
    names = ", ".join(f"supervisor.{m}" for m in SUPERVISOR_CORE)
    code = (
        f"import sys, {names}; print(sorted({{'asyncio', 'zmq', 'subprocess'}} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
