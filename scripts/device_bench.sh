#!/usr/bin/env bash
# The GPU/TPU figures of docs/performance.md: `python -m nbjax.bench` on the default MNIST and
# CIFAR-10 configs.
#
#   [PYTHON=python3] [BUDGET_S=570] bash scripts/device_bench.sh OUTDIR [PART ...]
#
# PART (default: all, in this order):
#   population      populations of 1 to 64 members: the full MNIST step (gmp+burden) and the
#                   CIFAR-10 full step in bf16, each beside its single run, with the goals
#   variants        every variant of both configs, and PyTorch eager
#   cache           the MNIST command again: the persistent compilation cache serves it
#   steps_per_call  MNIST with 1 and 50 steps per host call (10 is the default)
# A smoke check of the variants and of a population runs first; if it fails, nothing else does.
#
# The whole script stays within BUDGET_S seconds (default 570, for a 10-minute device call):
# each bench run is bounded by `timeout` at the smaller of its own limit and the budget left,
# and is skipped when under a minute is left. All parts take about 11 minutes, so a
# full set is two calls, e.g. `... OUTDIR population` then `... OUTDIR variants cache
# steps_per_call`. Where nbjax's dependencies are not installed (a bare accelerator image),
# put their wheels in .whl/ first; they are installed into /tmp/site without touching the
# system packages.
set -uo pipefail
# shellcheck source=device_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"
out=${1:?usage: scripts/device_bench.sh OUTDIR [population|variants|cache|steps_per_call ...]}
shift
parts=${*:-population variants cache steps_per_call}
budget=${BUDGET_S:-570}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device_setup "$py"
"$py" -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tail -1

bench() {  # bench SECONDS NAME ARGS...
  local name=$2 left=$((budget - SECONDS)) limit=$1
  shift 2
  if ((left < 60)); then
    echo "=== $name: skipped, ${left} s of the ${budget} s budget left"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s, at ${SECONDS} s): python -m nbjax.bench $*"
  timeout "$limit" "$py" -m nbjax.bench --json "$out/$name.json" "$@" 2>&1 \
    | grep -v "^[IW][0-9]\{4\} " | tee "$out/$name.txt"
}
wants() { [[ " $parts " == *" $1 "* ]]; }

# A quick end-to-end check first: if even the smoke config fails, stop here.
bench 90 smoke --config configs/smoke.py --variants plain_jax,dense,gmp+burden --steps 3 \
  --population 1,2 || { echo "smoke bench failed"; exit 1; }
if wants population; then
  # Each size is compiled once (about 15 s on an H200) and timed beside the single run.
  sizes=1,2,4,8,16,32,64
  echo "goal: the full MNIST step's population x32 >= 10 x the single run's img/s"
  bench 240 gpu_mnist_vit4_population --config configs/mnist_vit4.py --population "$sizes" \
    --steps 100
  echo "goal: the CIFAR-10 full step in bf16 reaches >= 15 % MFU in a population"
  bench 240 gpu_cifar10_vit4_population_bf16 --config configs/cifar10_vit4.py \
    --population "$sizes" --population_variant gmp+burden+bf16 --steps 100
fi
if wants variants; then
  variants=plain_jax,dense,gmp,rigl,gmp+burden,rigl+burden,gmp+burden+tome,dense+bf16,gmp+burden+bf16
  bench 170 gpu_mnist_vit4 --config configs/mnist_vit4.py --variants "$variants" --torch --steps 200
  bench 150 gpu_cifar10_vit4 --config configs/cifar10_vit4.py --torch --steps 100 \
    --variants plain_jax,dense,gmp,gmp+burden,gmp+burden+tome,dense+bf16,gmp+burden+bf16
fi
if wants cache; then
  # The same command again: the persistent compilation cache serves every compile (after
  # `variants` in the same call: a fresh machine starts with an empty cache).
  bench 45 gpu_mnist_vit4_cached --config configs/mnist_vit4.py --variants dense,gmp+burden \
    --steps 50
fi
if wants steps_per_call; then
  # Steps fused per host call: 1 (one dispatch per step) and 50, against the default 10.
  for k in 1 50; do
    bench 60 "gpu_mnist_vit4_k$k" --config configs/mnist_vit4.py --variants dense,gmp+burden \
      --steps 60 --config.train.steps_per_call=$k
  done
fi
echo "done in ${SECONDS} s"
