# shellcheck shell=bash
# Helpers shared by the device scripts (device_bench.sh, device_study.sh, device_tune.sh);
# sourced, not run. Each script puts the checkout on PYTHONPATH itself, before anything
# imports nbjax.

# device_setup PY: installs the wheels in .whl/ (if any: a bare accelerator image without
# nbjax's dependencies) into /tmp/site without touching the system packages, adds them to
# PYTHONPATH, and prints the GPUs.
device_setup() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  nvidia-smi -L 2>/dev/null
}

# cifar10_jpeg_dir: the JPEG copy of CIFAR-10: $DATA, else shared/data/cifar10-jpeg in the
# checkout, else ../shared/data/cifar10-jpeg.
cifar10_jpeg_dir() {
  if [[ -n ${DATA:-} ]]; then echo "$DATA"
  elif [[ -d shared/data/cifar10-jpeg ]]; then echo shared/data/cifar10-jpeg
  else echo ../shared/data/cifar10-jpeg
  fi
}

# with_limit CMD...: runs CMD, stopped with SIGTERM (then SIGKILL 60 s later) after $LIMIT_S
# seconds when LIMIT_S is set; its exit status is CMD's, or timeout's.
with_limit() {
  if [[ -n ${LIMIT_S:-} ]]; then
    timeout --signal=TERM --kill-after=60 "$LIMIT_S" "$@"
  else
    "$@"
  fi
}
