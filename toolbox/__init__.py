"""The shared toolbox every command builds on: errors and exit codes, the one command-line runner,
failpoints, file locks, sizes, redaction and plot fonts. It imports no torch and nothing of ours."""
