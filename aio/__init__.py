"""asyncio building blocks shared by every process: the supervisor, the workers,
the signaling server and the CLI. No I/O of its own; imports none of our packages."""
