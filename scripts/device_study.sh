#!/usr/bin/env bash
# The paper's CIFAR-10 grid on one GPU, trained as populations (configs/study_cifar10_gpu.py):
# dense, plus gmp / rigl / set / static / pdwp x sparsity 0.5 / 0.9 / 0.98 x mitigation
# none / both (static and pdwp: none only), seeds 0-2: 75 cells, 9 populations.
#
#   [PYTHON=python3] [DATA=DIR] [WORKDIR=DIR] [POPULATION_SIZE=16] [LIMIT_S=SECONDS] \
#       bash scripts/device_study.sh OUTDIR [--full] [--dry-run]
#
# By default a REDUCED grid: every cell and seed, but 3 epochs (100 warm-up steps) instead of
# 100, so that it fits about 10 minutes of one H200 by the dry run's estimate (about 9 min;
# the full grid is about 2 h by the same estimate, which counts a population member at the
# single run's step time of docs/performance.md). Its study is named cifar10_gpu_e3.
#   --full      the paper's 100 epochs (study cifar10_gpu)
#   --dry-run   print the populations and the time estimate; train nothing
# Records go to OUTDIR/<study>/cells/<cell>.json (the layout of docs/results/<study>/cells),
# the report to OUTDIR/<study>/report.md, and both, packed, to OUTDIR/<study>.tar.gz. Run
# directories and the populations' checkpoints go to WORKDIR (default /tmp/nbjax_study_<study>),
# where a second call resumes. DATA: the JPEG copy of CIFAR-10 (default shared/data/cifar10-jpeg
# in the checkout, else ../shared/data/cifar10-jpeg); results on it are not bit-exact CIFAR-10.
# LIMIT_S stops the study with SIGTERM after that many seconds (it saves a checkpoint), then
# packs what is recorded. Where nbjax's dependencies are not installed, put their wheels in
# .whl/ first (as for scripts/device_bench.sh).
set -uo pipefail
# shellcheck source=device_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
out="" full=0 dry=()
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --full) full=1 ;;
    --dry-run) dry=(--dry-run) ;;
    -*) echo "unknown option: $arg" >&2; usage >&2; exit 2 ;;
    *) [[ -z $out ]] || { echo "one OUTDIR only" >&2; exit 2; }; out=$arg ;;
  esac
done
[[ -n $out ]] || { usage >&2; exit 2; }

py=${PYTHON:-python3}
if (( full )); then
  name=cifar10_gpu
  reduce=()
else
  name=cifar10_gpu_e3
  reduce=(--config.base.train.num_epochs=3 --config.base.train.warmup_steps=100)
fi
data=$(cifar10_jpeg_dir)
workdir=${WORKDIR:-/tmp/nbjax_study_$name}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
study=("$py" -m nbjax.study --config configs/study_cifar10_gpu.py --workdir "$workdir"
       --records "$out/$name/cells" --population_size "${POPULATION_SIZE:-16}"
       --config.name="$name" --config.base.data.path="$data" "${reduce[@]}")

if (( ${#dry[@]} )); then
  echo "study $name: ${reduce[*]:-the full grid, 100 epochs}; data $data"
  exec "${study[@]}" "${dry[@]}"
fi
[[ -d $data ]] || { echo "no CIFAR-10 JPEG copy at $data: set DATA" >&2; exit 2; }
mkdir -p "$out/$name"
device_setup "$py"
start=$SECONDS
with_limit "${study[@]}" 2>&1 | grep -v "^[IW][0-9]\{4\} " | tee "$out/$name/study.log"
status=${PIPESTATUS[0]}
echo "study exit $status after $(( SECONDS - start )) s" | tee -a "$out/$name/study.log"
"$py" -m nbjax.report "$out/$name" 2>&1 | tail -3
tar -czf "$out/$name.tar.gz" -C "$out" "$name"
exit "$status"
