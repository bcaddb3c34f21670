"""The shared toolbox every command builds on: errors and exit codes, the one command-line runner,
failpoints, file locks, progress lines for log files, cores and torch threads, sizes, redaction,
plot fonts, folder walks, safe CSV cells, and the harness tests and benches share (testing.py). It
imports no torch and nothing of ours."""
