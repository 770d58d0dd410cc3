"""The search loop and its results: strategy configs, the runner, failures.csv/census.csv, objectives, coverage, minimisation."""
