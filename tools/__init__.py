"""The command line (`infini`): thin wiring of arguments to the API."""
