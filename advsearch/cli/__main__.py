"""`python -m advsearch.cli`: the same as the `advsearch` command."""

from advsearch.cli.main import main

main()
