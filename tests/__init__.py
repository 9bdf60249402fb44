"""The test suite; helpers are imported as `tests.<module>` (pytest puts the repository root on the path)."""
