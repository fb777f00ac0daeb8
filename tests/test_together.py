"""nbjax.parallel.together: a call compiled in every process before any process runs it.

Gloo gives processes 30 s to meet at their first collective. Here one of two processes
starts its first call 40 s after the other (as a process that compiles slowly on a busy host
does); through ``CompiledTogether`` both still meet and compute the same cross-process sum.
"""

import sys

import jax
import jax.numpy as jnp
from helpers import SKIP_EXIT, child_env, free_port, run_process_group

from nbjax.parallel.together import CompiledTogether

LATE_S = 40  # longer than Gloo's 30 s

WORKER = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, "tests")
from helpers import join_process_group
from nbjax.parallel.together import CompiledTogether

port, pid, late_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
join_process_group(f"127.0.0.1:{port}", 2, pid)
mesh = jax.make_mesh((2,), ("data",))
row = NamedSharding(mesh, P("data"))
x = jax.make_array_from_process_local_data(row, np.full((1,), pid + 1.0, np.float32))
total = CompiledTogether(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P())), "sum")
time.sleep(late_s)
value = float(total(x))
assert value == 3.0, value
print("sum", value)
"""


def test_one_process_calls_the_jitted_function_itself():
    jitted = jax.jit(lambda x: x * 2)
    call = CompiledTogether(jitted, "double")
    assert float(call(jnp.float32(3.0))) == 6.0
    assert call.lower(jnp.float32(3.0)).as_text() == jitted.lower(jnp.float32(3.0)).as_text()


def test_a_process_that_starts_its_first_call_late_still_meets_the_other(tmp_path):
    port = free_port()
    commands = [([sys.executable, "-c", WORKER, str(port), str(pid), str(late)], child_env(1))
                for pid, late in ((0, 0), (1, LATE_S))]
    logs = [tmp_path / "process0.log", tmp_path / "process1.log"]
    run_process_group(commands, logs, timeout_s=300, skip_exit=SKIP_EXIT)
    assert all("sum 3.0" in log.read_text() for log in logs)
