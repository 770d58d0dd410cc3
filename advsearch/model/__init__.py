"""The model and its evaluation: spec, tokens, checkpoint loading, the fused evaluator, the oracle and the judge, training."""
