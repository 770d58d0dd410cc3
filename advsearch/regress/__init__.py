"""Robustness regression suites: building, reading and evaluating them against a checkpoint."""
