"""Benchmarks of mmono: speed, memory and recovery measurements run as scripts, not tests."""
