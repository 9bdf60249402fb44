"""Layout planner: predict every accepted layout's per-rank memory and step time for a world of
devices, before any process starts (`python -m launch plan`)."""
