"""Test and script harness: long-running child processes, watched and stopped by pid.

One definition shared by ``tunnelctl demo``, the scripts (``bench.py``,
``natlab.py``) and every test: :class:`Child` starts any program (or a
``tunnelctl`` verb, :meth:`Child.tunnelctl`), waits for its readiness line on
stdout with a deadline and stops it by pid. It imports only the standard
library and none of our packages, so scripts may use it while importing no
``tunnelctl`` code (ARCHITECTURE.md).
"""

from harness.child import READY_TIMEOUT, Child, ChildFailed

__all__ = ["READY_TIMEOUT", "Child", "ChildFailed"]
