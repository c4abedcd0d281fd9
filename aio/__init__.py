"""asyncio building blocks shared by every process: the supervisor, the workers,
the signaling server and the CLI (and the ``/metrics`` endpoint they serve).
Imports none of our packages."""
