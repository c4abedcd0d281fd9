"""Wire formats and sans-I/O state machines of tunnelctl; no sockets, no I/O.

The contract is ``protocol/PROTOCOL.md``. This package imports none of the
other tunnelctl packages.
"""
