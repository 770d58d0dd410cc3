"""The mechanism: detector and responsibility tables from the weights, the path forward, per-failure explanations."""
