"""Test scaffolding shared by the test suite and the benchmarks (not shipped in the wheel):
real server processes, private Redis servers, and small protocol clients."""
