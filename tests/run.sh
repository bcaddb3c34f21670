#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# The Slurm tests start a real two-node cluster; they need slurmctld/slurmd/munge (Debian packages).
if ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing slurm + munge for the cluster tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null) \
    || echo "could not install slurm: the cluster tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
