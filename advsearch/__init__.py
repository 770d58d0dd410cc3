"""advsearch: find where small algorithmic transformers break, and why."""

__version__ = "0.1.0"
