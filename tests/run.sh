#!/usr/bin/env bash
# The test command: installs what the tests need, checks lint and format, then runs the tests.
#   bash tests/run.sh [pytest args]           the whole suite (unit + end-to-end + Slurm; ~25 min on 2 cores)
#   bash tests/run.sh --quick [pytest args]   unit tests only: no subprocess training, no cluster
set -euo pipefail
cd "$(dirname "$0")/.."
quick=false
if [ "${1:-}" = --quick ]; then
  quick=true
  shift
fi
bash launch/setup_env.sh
# The Slurm tests start a real two-node cluster; they need slurmctld/slurmd/munge (Debian packages).
# The compiled-training test needs a C++ compiler: torch.compile generates C++ for the CPU.
# The quick tier runs neither, so it installs neither.
packages=()
if ! $quick; then
  command -v slurmctld >/dev/null 2>&1 || packages+=(slurmctld slurmd slurm-client munge)
  command -v g++ >/dev/null 2>&1 || packages+=(g++)
fi
if [ ${#packages[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${packages[*]} for the cluster and compile tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null) \
    || echo "could not install ${packages[*]}: the tests that need them will fail or be skipped" >&2
fi
# Form is kept by a tool: lint and format are checked before any test runs (`ruff format .` fixes the latter).
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if $quick; then
  # e2e and slurm: pyproject.toml's markers, on every test that trains in subprocesses or starts a cluster.
  exec .venv/bin/python -m pytest -m "not e2e and not slurm" "$@"
fi
exec .venv/bin/python -m pytest "$@"
