"""Commands that compose strategies with the core: search set-up, benchmarks, hardening, model comparison, scale-out."""
