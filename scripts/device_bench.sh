#!/usr/bin/env bash
# The GPU/TPU figures of docs/performance.md: `python -m nbjax.bench` on the default MNIST and
# CIFAR-10 configs, a second run for the compilation cache, and steps_per_call 1 vs 10 vs 50.
#
#   [PYTHON=python3] bash scripts/device_bench.sh OUTDIR
#
# Each bench run is bounded by `timeout` so that one slow compile cannot eat the others.
# Where nbjax's dependencies are not installed (a bare accelerator image), put their wheels
# in .whl/ first; they are installed into /tmp/site without touching the system packages.
set -uo pipefail
out=${1:?usage: scripts/device_bench.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi -L 2>/dev/null
"$py" -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tail -1

bench() {  # bench SECONDS NAME ARGS...
  local limit=$1 name=$2; shift 2
  echo "=== $name: python -m nbjax.bench $*"
  timeout "$limit" "$py" -m nbjax.bench --json "$out/$name.json" "$@" 2>&1 \
    | grep -v "^[IW][0-9]\{4\} " | tee "$out/$name.txt"
}
# A quick end-to-end check first: if even the smoke config fails, stop here.
bench 60 smoke --config configs/smoke.py --variants plain_jax,dense,gmp+burden --steps 3 \
  || { echo "smoke bench failed"; exit 1; }
variants=plain_jax,dense,gmp,rigl,gmp+burden,rigl+burden,gmp+burden+tome,dense+bf16,gmp+burden+bf16
bench 170 gpu_mnist_vit4 --config configs/mnist_vit4.py --variants "$variants" --torch --steps 200
bench 150 gpu_cifar10_vit4 --config configs/cifar10_vit4.py --torch --steps 100 \
  --variants plain_jax,dense,gmp,gmp+burden,gmp+burden+tome,dense+bf16,gmp+burden+bf16
# The same command again: the persistent compilation cache serves every compile.
bench 45 gpu_mnist_vit4_cached --config configs/mnist_vit4.py --variants dense,gmp+burden \
  --steps 50
# Steps fused per host call: 1 (one dispatch per step) and 50, against the default 10 above.
for k in 1 50; do
  bench 60 "gpu_mnist_vit4_k$k" --config configs/mnist_vit4.py --variants dense,gmp+burden \
    --steps 60 --config.train.steps_per_call=$k
done
