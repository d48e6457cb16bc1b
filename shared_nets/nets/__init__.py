"""Method networks, one public model per module (see docs/architecture.md)."""
