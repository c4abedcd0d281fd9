"""The import rules of ARCHITECTURE.md, checked on the source."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "signaling", "supervisor", "workers", "tunnelctl")
FORBIDDEN = {
    "protocol": {"signaling", "supervisor", "workers", "tunnelctl", "aiortc", "websockets", "zmq"},
    "signaling": {"supervisor", "workers", "tunnelctl", "aiortc"},
    "supervisor": {"workers", "tunnelctl", "aiortc", "aioice"},
    "workers": {"supervisor", "signaling", "tunnelctl"},
}
#: The client end of signaling is shared by the device side (supervisor) and the
#: client side (workers); the server is imported by neither.
SHARED_CLIENT_END = frozenset({"signaling.link", "signaling.errors"})


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


def test_every_package_is_typed() -> None:
    for package in PACKAGES:
        assert (ROOT / package / "py.typed").exists(), package
