"""Straightforward re-implementations of the authors' released algorithms (test oracles and benchmark baselines)."""
