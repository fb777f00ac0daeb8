#!/usr/bin/env bash
# Runs a study in the background from a separate clone at a fixed commit, and commits each
# finished cell's record into the main checkout as it lands (docs/study.md).
#
#   bash scripts/study_worker.sh [--commit REV] [--root DIR] [--records STORE] STUDY_CONFIG
#                                [STUDY_ARGS...]
#
# The clone and its venv live in DIR (default ../nbjax-worker-<name of the config>), so the
# checkout being edited is never the code that runs. The study writes its records straight
# into this checkout's records store (STORE, a path inside it; default the config's own, as
# the clone's nbjax resolves it), skips cells that already have one, and this script commits
# each new record on its own (`git commit -- <record>`: nothing else staged or changed is
# committed). Stop it with Ctrl-C or kill; run it again to continue.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
main_repo=$(cd "$(dirname "$0")/.." && pwd)
commit=HEAD root="" records=""
while [ $# -gt 0 ]; do
  case $1 in
    --commit) commit=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --records) records=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || usage
config=$1; shift
[ -f "$main_repo/$config" ] || { echo "error: no study config $config in $main_repo" >&2; exit 2; }
name=$(basename "$config" .py)
root=${root:-$main_repo/../nbjax-worker-$name}
rev=$(git -C "$main_repo" rev-parse "$commit")

mkdir -p "$root"
if [ ! -d "$root/src/.git" ]; then
  git clone -q "$main_repo" "$root/src"
fi
git -C "$root/src" fetch -q "$main_repo" "$rev" 2>/dev/null || git -C "$root/src" fetch -q origin
git -C "$root/src" checkout -q --detach "$rev"
make -C "$root/src" install >/dev/null
if [ -z "$records" ]; then  # where the study itself would write them, relative to the repo
  records=$(cd "$root/src" && .venv/bin/python -c "import sys
from nbjax.config import load_config_file
from nbjax.study.grid import records_dir
print(records_dir(load_config_file(sys.argv[1])))" "$config")
fi
mkdir -p "$main_repo/$records"
echo "worker: $config at $(git -C "$root/src" rev-parse --short HEAD), records in $main_repo/$records"

commit_new_records() {  # new or changed files of the records dir, one commit each
  local f
  for f in $(git -C "$main_repo" status --porcelain --untracked-files=all -- "$records" \
             | awk '{print $NF}' | grep -v '\.tmp$'); do
    for _ in 1 2 3 4 5; do
      if git -C "$main_repo" add -- "$f" && \
         git -C "$main_repo" commit -q -m "study $name: record $(basename "$f" .json)" -- "$f"; then
        echo "committed $f"; break
      fi
      sleep 3  # another git command holds the index lock
    done
  done
}

(cd "$root/src" && .venv/bin/python -m nbjax.study --config "$config" \
   --workdir "$root/study" --records "$main_repo/$records" "$@") &
study_pid=$!
trap 'kill $study_pid 2>/dev/null; wait $study_pid 2>/dev/null; commit_new_records; exit 130' INT TERM
while kill -0 "$study_pid" 2>/dev/null; do
  commit_new_records
  sleep 30
done
wait "$study_pid" && status=0 || status=$?
commit_new_records
exit "$status"
