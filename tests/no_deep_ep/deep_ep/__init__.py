"""Put first on a process's path, this makes `import deep_ep` fail whether or not DeepEP is
installed, so a test of the fallback to alltoall sees the same thing on every machine."""

raise ImportError("deep_ep hidden by tests/no_deep_ep")
