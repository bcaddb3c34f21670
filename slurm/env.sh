# Sourced by the job scripts: the checkout (REPO: this file's parent folder), the user's environment
# set-up, the virtualenv, and the checkout on PYTHONPATH.
#   ENV_SETUP  shell code run first, e.g. "module load cuda/12.4; conda activate sed"
#   VENV       virtualenv to activate (default: the repo's .venv; empty: use PATH as it is)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -n "${ENV_SETUP:-}" ] && eval "$ENV_SETUP"
VENV=${VENV-$REPO/.venv}
if [ -n "$VENV" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate" || { echo "cannot activate VENV=$VENV" >&2; exit 2; }
fi
export REPO PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
