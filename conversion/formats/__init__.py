"""Other checkpoint formats: a declarative map per family and the engine that applies them (``checkpoint``)."""
