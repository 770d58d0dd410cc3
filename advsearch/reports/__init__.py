"""Reports on finished runs: the explanation audit, the HTML report and its figures."""
