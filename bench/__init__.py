"""Phasecast benchmark harness: ``python -m bench [scenario] …`` (see docs/benchmarks.md).

The server under test, the load generator, the publisher and the python-socketio baseline
each run in their own process, so every process's CPU can be read from /proc separately.
"""
