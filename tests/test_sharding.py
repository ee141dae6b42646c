"""Several devices (fusedrk/_shard.py): tests/sharded_check.py on 4 host devices, in a
subprocess so that this process keeps its one device."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("part", ["jax", "pallas", "rest"])
def test_sharded_solves_equal_the_unsharded_ones(part):
    # --quick: B = 4 and 7 only; the B = 1,000 cases took about a minute of CI's time for the
    # kernels (interpret mode). `python tests/sharded_check.py` runs them all. Three parts, so
    # that the suite's processes share them (one process took about 3 minutes).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, os.path.join(HERE, "sharded_check.py"), "--quick", "--part", part],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "all sharded solves equal the unsharded ones" in done.stdout


def test_the_readme_example_runs_as_written_on_4_devices():
    with open(os.path.join(HERE, "..", "README.md")) as fh:
        section = fh.read().split("## Several devices", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "4 devices: loss" in done.stdout and "grad sharded as P('lanes',)" in done.stdout, done.stdout
