"""Backend-chosen ops. Each module exposes one function; the portable XLA version runs everywhere."""
