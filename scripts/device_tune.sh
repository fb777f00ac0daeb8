#!/usr/bin/env bash
# Dense CIFAR-10 for 100 epochs with mixup / CutMix on one GPU (configs/cifar10_vit4_mix.py):
# one population whose members differ only in the mixing alpha, so one compiled program
# answers "which alpha, and does the recipe reach 80 %".
#
#   [PYTHON=python3] [DATA=DIR] [WORKDIR=DIR] [ALPHAS="0 0.2 0.8 1"] [EPOCHS=100] \
#       [LIMIT_S=SECONDS] bash scripts/device_tune.sh OUTDIR [--config.KEY=VALUE ...]
#
# Writes OUTDIR/cifar10_tune.json (per member: alpha, final test accuracy and loss, steps, the
# test accuracy every 10 epochs) and OUTDIR/cifar10_tune.tar.gz (the members' config.json,
# metrics.jsonl and final_metrics.json). Member runs and the population's checkpoint go to
# WORKDIR (default /tmp/nbjax_tune), where a second call resumes. DATA: the JPEG copy of
# CIFAR-10 (default shared/data/cifar10-jpeg in the checkout, else ../shared/data/cifar10-jpeg;
# not bit-exact CIFAR-10: results on it must say so). LIMIT_S stops training with SIGTERM
# after that many seconds (a checkpoint is saved), then collects what finished. Extra
# --config.KEY=VALUE flags change every member (e.g. --config.model.hidden_dim=128). Where
# nbjax's dependencies are not installed, put their wheels in .whl/ first.
set -uo pipefail
# shellcheck source=device_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case ${1:-} in
  -h|--help) usage; exit 0 ;;
  ""|-*) usage >&2; exit 2 ;;
esac
out=$1
shift
for arg in "$@"; do
  [[ $arg == --config.* ]] || { echo "not a --config.KEY=VALUE flag: $arg" >&2; exit 2; }
done

py=${PYTHON:-python3}
data=$(cifar10_jpeg_dir)
[[ -d $data ]] || { echo "no CIFAR-10 JPEG copy at $data: set DATA" >&2; exit 2; }
workdir=${WORKDIR:-/tmp/nbjax_tune}
members=""
for alpha in ${ALPHAS:-0 0.2 0.8 1}; do
  members+="${members:+;}data.mix_alpha=$alpha"
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device_setup "$py"
start=$SECONDS
with_limit "$py" -m nbjax.population --config configs/cifar10_vit4_mix.py \
  --workdir "$workdir" --members "$members" --config.data.source=image_folder \
  --config.data.path="$data" --config.burden.enabled=False --config.train.progress=False \
  --config.train.num_epochs="${EPOCHS:-100}" "$@" 2>&1 | grep -v "^[IW][0-9]\{4\} " \
  | tee "$out/cifar10_tune.log"
status=${PIPESTATUS[0]}
echo "population exit $status after $(( SECONDS - start )) s" | tee -a "$out/cifar10_tune.log"
"$py" - "$workdir" "$out/cifar10_tune.json" <<'PY'
import json, pathlib, sys
from etils import epath
from nbjax.study.records import read_log
from nbjax.train.loop import final_metrics
workdir, members = pathlib.Path(sys.argv[1]), []
for run in sorted(p.parent for p in workdir.glob("*/config.json")):
    config = json.loads((run / "config.json").read_text())
    evals = [[line["step"], line["test/accuracy"]] for line in read_log(str(run))[1]]
    members.append({"member": run.name, "mix_alpha": config["data"]["mix_alpha"],
                    "final": final_metrics(epath.Path(run)), "test_accuracy": evals})
    print(f"{run.name}: alpha {members[-1]['mix_alpha']}, test accuracy "
          f"{evals[-1:] or 'none yet'}")
pathlib.Path(sys.argv[2]).write_text(json.dumps({"members": members}, indent=1))
PY
tar -czf "$out/cifar10_tune.tar.gz" -C "$workdir" --exclude=population --exclude=checkpoints \
  --exclude='events.*' .
exit "$status"
