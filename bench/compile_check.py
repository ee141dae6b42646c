"""Do the Pallas kernels compile for an H100? Checked without a GPU, through the public ``solve``.

    python bench/compile_check.py [--group solves catalogue components sizes launch] [--variants NAME ...]
                                  [--launch TILE WARPS] [--json FILE] [--keep DIR]

Two levels, over groups of variants; each variant is the ``jit(grad)`` of a loss through
``fusedrk.solve(backend="pallas")``, so it lowers one forward and one reverse kernel:

- ``solves`` (``VARIANTS``): the solve's options on a two-component oscillator: float32/float64
  x fixed/adaptive x ``ts``/t1-only x forwards/backwards in time, per-lane, shared and integer
  arguments, B from 1 to 65,536, and fields using ``jnp.where``/``jnp.clip``/``jax.nn.softplus``.
- ``catalogue`` (``CATALOGUE_VARIANTS``): every field of ``fusedrk.problems.catalogue`` at
  B = 65,536 in float32 with fixed steps, a few in float64 with adaptive steps, and Lorenz as a
  tuple of three scalar leaves (``lorenz-tuple``: the same field as ``lorenz-vector``) to compare
  their instruction counts.
- ``components`` (``COMPONENT_VARIANTS``, only on request): a Lotka-Volterra chain of N species
  (N = 8 ... 128, above ``MAX_STATE_COMPONENTS`` too) to see where registers spill.
- ``sizes`` (``SIZE_VARIANTS``, only on request): the catalogue's MLP with 4, 8, 16 and 32
  hidden units, to time the compile against the field's size (``MAX_TILE_OPERATIONS``). Its
  weights are blocks now (``MIN_BLOCK_COMPONENTS``); the per-weight measurements in
  bench/README.md were taken at commit cc03775.
- ``launch`` (``LAUNCH_VARIANTS``, only on request): the seed and seed-nl at 2,250 lanes, to
  compare the launch ``kernels/_triton.choose_launch`` picks with another (``--launch TILE WARPS``
  forces one on every kernel without block values).

By default the ``solves`` and ``catalogue`` groups run. Two levels of checking:

- ``lower_variant`` (any jax >= 0.10.2, no extra packages; run by ``tests/test_compile.py`` in
  CI): lowers for CUDA on the CPU, captures each kernel's Triton module and runs the Triton IR
  verifier over it. Invalid IR (a type mismatch in a loop bound, say) fails here.
- ``main`` (needs jax, jaxlib and jax-cuda12-pjrt 0.11.2, the GPU machine's versions, on Python
  3.12, and ``nvidia-cuda-nvcc-cu12`` for ptxas): compiles each variant with XLA's own GPU
  pipeline for a deviceless H100 and reports per kernel: compiles or the first error line,
  registers, spill bytes, shared memory and theoretical occupancy (``ptxas -v``). Exit status 1
  if any kernel fails. Set up once with::

      PYENV_VERSION=3.12.1 python3.12 -m venv /tmp/gpuc
      /tmp/gpuc/bin/pip install jax==0.11.2 jaxlib==0.11.2 equinox setuptools nvidia-cuda-nvcc-cu12
      /tmp/gpuc/bin/pip install --no-deps jax-cuda12-pjrt==0.11.2 jax-cuda12-plugin==0.11.2
      /tmp/gpuc/bin/pip install --no-deps --no-build-isolation -e .

A compile is not a run: numbers, speed and anything decided at run time need a GPU
(``bench/gpu_check.py``).
"""

from __future__ import annotations

import os
import sys
import tempfile

if __name__ == "__main__":
    # Before jax starts a backend: the CPU backend (the CUDA plugin is loaded for its compiler
    # only), and an XLA dump holding the PTX of each Triton kernel (all four flags are needed
    # for jax-cuda12-pjrt 0.11.2 to write it).
    _DUMP = tempfile.mkdtemp(prefix="fusedrk-compile.")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_DUMP, "triton"))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP}/xla"
                               " --xla_gpu_dump_llvmir=true --xla_dump_emitter_re=.*"
                               " --xla_dump_hlo_module_re=.*variant.*").strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import glob
import json
import math
import re
import shutil
import subprocess
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fusedrk
from fusedrk import problems
from fusedrk.kernels import _problem, _triton

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

BATCHES = (1, 7, 129, 2250, 65536)
ARG_KINDS = ("per-lane", "shared", "integer")


class Variant(NamedTuple):
    dtype: str
    adaptive: bool
    save_ts: bool
    backward: bool  # t1 < t0
    args: str  # one of ARG_KINDS: which arguments are per lane
    B: int
    field: str = "oscillator"  # or "natural": jnp.where, jnp.clip, jax.nn.softplus (nested `jit`)

    @property
    def name(self) -> str:
        return "-".join([
            self.dtype, "adaptive" if self.adaptive else "fixed", "ts" if self.save_ts else "t1",
            "bwd" if self.backward else "fwd", self.args, f"B{self.B}", self.field,
        ])


def _variants() -> list:
    """Every dtype x step mode x save mode x direction, with the batch sizes and argument kinds
    spread over them so that each appears in both dtypes; two natural-field variants."""
    out = []
    for i, (dtype, adaptive, save_ts, backward) in enumerate(
        (d, a, s, b) for d in ("float32", "float64") for a in (False, True) for s in (True, False)
        for b in (False, True)
    ):
        out.append(Variant(dtype, adaptive, save_ts, backward, ARG_KINDS[i % 3], BATCHES[i % 5]))
    out += [Variant("float32", True, True, False, "integer", 129, "natural"),
            Variant("float64", False, False, True, "per-lane", 7, "natural")]
    return out


VARIANTS = _variants()


class CatalogueVariant(NamedTuple):
    """A field of ``fusedrk.problems.catalogue``, ``lorenz-tuple``, ``chain-N`` (N species),
    ``mlp-H`` (H hidden units), ``seed`` (linear: a tape without the state) or ``seed-nl``, solved from 0 to
    the case's t1 with its dt0 and three save times."""

    field: str
    dtype: str
    adaptive: bool
    B: int = 65536

    @property
    def name(self) -> str:
        return f"catalogue-{self.field}-{self.dtype}-{'adaptive' if self.adaptive else 'fixed'}-B{self.B}"


# float64 with adaptive steps: the 3-vector whose instruction count is compared with the tuple
# version, the largest fields (kuramoto: 8 components, 64 sines; the MLP: ~300 tile products),
# and the one with the most transcendental functions per component (the double pendulum).
F64_ADAPTIVE = ("lorenz-vector", "double-pendulum", "kuramoto-8", "neural-ode-mlp")
CATALOGUE_VARIANTS = (
    [CatalogueVariant(name, "float32", False) for name in problems.CATALOGUE_NAMES]
    + [CatalogueVariant(name, "float64", True) for name in F64_ADAPTIVE]
    + [CatalogueVariant("lorenz-tuple", "float32", False), CatalogueVariant("lorenz-tuple", "float64", True)]
    + [CatalogueVariant("seed", "float32", False), CatalogueVariant("seed-nl", "float32", False)]
)
COMPONENTS = (8, 16, 32, 64, 128)
COMPONENT_VARIANTS = ([CatalogueVariant(f"chain-{n}", "float32", False) for n in COMPONENTS]
                      + [CatalogueVariant(f"chain-{n}", "float64", True) for n in COMPONENTS])
# The catalogue's MLP (4 -> 32 -> 4) with narrower hidden layers: compile time against the
# field's size in tile operations (``kernels._problem.MAX_TILE_OPERATIONS``).
HIDDEN = (4, 8, 16, 32)
SIZE_VARIANTS = [CatalogueVariant(f"mlp-{h}", "float32", False) for h in HIDDEN]
# The seeds at the 2,250 lanes bench/gpu_check.py times at several launch shapes: the launch
# choose_launch picks for them (16 lanes, 1 warp on 132 SMs) against ``--launch 128 4``.
LAUNCH_VARIANTS = [CatalogueVariant(name, "float32", False, 2250) for name in ("seed", "seed-nl")]
GROUPS = {"solves": VARIANTS, "catalogue": CATALOGUE_VARIANTS, "components": COMPONENT_VARIANTS,
          "sizes": SIZE_VARIANTS, "launch": LAUNCH_VARIANTS}


def chain_field(t, y, k):
    """N species in a ring, each eaten by the next: O(N) work, N live components per value."""
    return y * (k - jnp.roll(y, 1))


def oscillator(t, y, args):
    x, v = y["x"], y["v"]
    return {"x": v, "v": -args["k"] * x - args["c"] * v + 0.1 * args["n"] * jnp.cos(t)}


def natural(t, y, args):
    x, v = y["x"], y["v"]
    force = jnp.clip(-args["k"] * x, -10.0, 10.0)
    damping = jax.nn.softplus(args["c"]) * v
    return {"x": v, "v": jnp.where(x > 0, force, 1.1 * force) - damping + 0.1 * args["n"] * jnp.cos(t)}


FIELDS = {"oscillator": oscillator, "natural": natural}


def catalogue_problem(v: CatalogueVariant):
    """(loss, (y0, args)) for a catalogue variant."""
    dtype = jnp.dtype(v.dtype)
    limit = None
    if v.field.startswith("chain-"):
        n = int(v.field.split("-")[1])
        lanes = np.linspace(0.5, 1.5, v.B * n).reshape(v.B, n)
        case = problems.Case(chain_field, jnp.asarray(lanes, dtype), jnp.asarray(lanes[:, 0] + 0.5, dtype), 0, 0.05, 0.3)
        limit = n
    elif v.field.startswith("mlp-"):
        hidden = int(v.field.split("-")[1])
        rng = np.random.default_rng(0)
        weights = problems.mlp_weights(rng, hidden, dtype)
        case = problems.Case(problems.neural_ode_field, jnp.asarray(rng.uniform(-1, 1, (v.B, 4)), dtype),
                             weights, None, 0.05, 0.3)
    elif v.field in ("seed", "seed-nl"):  # seed: its VJP reads no state, so the ring holds none
        p = problems.PROBLEMS[v.field]
        case = problems.Case(p.field, jnp.asarray(np.linspace(0.5, 1.5, v.B), dtype), None, None, 0.1, 1.0)
    elif v.field == "lorenz-tuple":
        vec = problems.catalogue(v.B, dtype)["lorenz-vector"]
        case = vec._replace(field=problems.lorenz_tuple_field, y0=tuple(vec.y0[:, j] for j in range(3)))
    else:
        case = problems.catalogue(v.B, dtype)[v.field]
    kw = dict(dt0=case.dt0, max_steps=64, throw=False, ts=np.linspace(0.0, case.t1, 3).astype(dtype))
    if v.adaptive:
        kw.update(rtol=1e-6, atol=1e-8)

    def loss(y0, args):
        # A chain longer than the kernels' limit, or a field larger than they take, is
        # compiled only to measure it.
        saved = _problem.MAX_STATE_COMPONENTS, _problem.MAX_TILE_OPERATIONS
        _problem.MAX_STATE_COMPONENTS = max(saved[0], 2 * (limit or 0))
        _problem.MAX_TILE_OPERATIONS = 10 ** 9
        try:
            sol = fusedrk.solve(case.field, y0, 0.0, case.t1, args=args, args_axes=case.args_axes,
                                backend="pallas", **kw)
        finally:
            _problem.MAX_STATE_COMPONENTS, _problem.MAX_TILE_OPERATIONS = saved
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(sol.ys))

    return loss, (case.y0, case.args)


def problem(v):
    """(loss, (y0, args)) for ``jax.grad(loss, argnums=(0, 1))``; times are concrete."""
    if isinstance(v, CatalogueVariant):
        return catalogue_problem(v)
    dtype = jnp.dtype(v.dtype)
    B = v.B
    lanes = np.linspace(0.5, 1.5, B).astype(dtype)
    y0 = {"x": jnp.asarray(lanes), "v": jnp.zeros((B,), dtype)}
    per_lane_k = jnp.asarray(1.0 + lanes)
    args = {
        "k": per_lane_k if v.args != "shared" else jnp.asarray(1.5, dtype),
        "c": jnp.asarray(0.2 * lanes) if v.args == "per-lane" else jnp.asarray(0.2, dtype),
        "n": jnp.arange(B, dtype=jnp.int32) % 3 if v.args == "integer" else jnp.asarray(2, jnp.int32),
    }
    axes = {
        "k": None if v.args == "shared" else 0,
        "c": 0 if v.args == "per-lane" else None,
        "n": 0 if v.args == "integer" else None,
    }
    t0, t1 = (1.0, 0.0) if v.backward else (0.0, 1.0)
    kw = dict(dt0=0.1 * (t1 - t0), max_steps=64, throw=False)
    if v.adaptive:
        kw.update(rtol=1e-6, atol=1e-6)
    if v.save_ts:
        kw["ts"] = np.linspace(t0, t1, 4).astype(dtype)

    def loss(y0, args):
        sol = fusedrk.solve(FIELDS[v.field], y0, t0, t1, args=args, args_axes=axes, backend="pallas", **kw)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(sol.ys))

    return loss, (y0, args)


def _grad_fn(v: Variant):
    loss, inputs = problem(v)
    fn = jax.grad(loss, argnums=(0, 1), allow_int=True)
    fn.__name__ = "variant_" + re.sub(r"\W", "_", v.name)  # names the XLA dump's files
    return jax.jit(fn), inputs


def lower_variant(v: Variant) -> list:
    """Lower the variant's jit(grad) for CUDA without a GPU; per kernel (name, verifier error
    or None), in launch order (forward, then reverse)."""
    with jax.enable_x64(v.dtype == "float64"):
        fn, inputs = _grad_fn(v)
        with _triton.gpu_lowering() as modules:
            fn.trace(*inputs).lower(lowering_platforms=("cuda",))
    return [(_triton.kernel_name(m), _triton.verify_error(m)) for m in modules]


# ------------------------------------------------------------------ the full compile (XLA)

# An H100 SXM as XLA's GpuTargetConfigProto (text format): what a deviceless compile targets.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 2 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# sm_90 per-SM limits for the occupancy estimate (the CUDA occupancy calculator's rules).
SM90 = dict(warps=64, blocks=32, regs=65536, reg_unit=256, smem=233472, smem_unit=128, smem_reserved=1024)


def occupancy(regs: int, threads: int, smem: int) -> tuple:
    """(blocks per SM, active warps / 64, the limiting resource)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / SM90["reg_unit"]) * SM90["reg_unit"]
    smem_block = math.ceil((smem + SM90["smem_reserved"]) / SM90["smem_unit"]) * SM90["smem_unit"]
    limits = {"regs": SM90["regs"] // regs_per_warp // warps, "smem": SM90["smem"] // smem_block,
              "warps": SM90["warps"] // warps, "blocks": SM90["blocks"]}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limits[limiter] * warps / SM90["warps"], limiter


def ptxas_resources(ptxas: str, ptx: str, kernel: str) -> dict:
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", "--warn-on-spills", ptx, "-o", ptx + ".cubin"],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        return {"error": "ptxas: " + text.strip().splitlines()[-1]}
    block = re.search(rf"entry function '{re.escape(kernel)}'.*?(?=entry function|\Z)", text, re.S)
    block = block.group(0) if block else text

    def num(pattern):
        found = re.search(pattern, block)
        return int(found.group(1)) if found else 0

    return {"regs": num(r"Used (\d+) registers"), "spill_store": num(r"(\d+) bytes spill stores"),
            "spill_load": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "smem": num(r"(\d+) bytes smem")}


def first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")


def compile_variant(v: Variant, mesh, dump: str, ptxas: str, keep: str | None = None) -> list:
    """XLA-compile one variant for the deviceless H100; a result dict per kernel."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    shutil.rmtree(dump, ignore_errors=True)
    with jax.enable_x64(v.dtype == "float64"):
        fn, inputs = _grad_fn(v)
        specs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), inputs)
        try:
            with _triton.gpu_lowering(mesh=mesh.abstract_mesh) as modules:
                lowered = fn.trace(*specs).lower()
        except Exception as e:  # a field the kernels refuse, or a lowering bug: a failed row, not a crash
            message = f"tracing/lowering: {type(e).__name__}: {first_error(str(e)) or e}"
            return [{"variant": v.name, "kernel": kernel, "verify": None, "error": message}
                    for kernel in ("fusedrk_forward", "fusedrk_reverse")]
        rows = [{"variant": v.name, "kernel": _triton.kernel_name(m), "verify": _triton.verify_error(m)}
                for m in modules]
        start = time.perf_counter()
        try:
            lowered.compile()
        except Exception as e:  # the compiler's own message is the result
            for row in rows:
                row["error"] = first_error(str(e))
            return rows
    seconds = time.perf_counter() - start
    launches = "\n".join(open(f).read() for f in glob.glob(os.path.join(dump, "*thunk_sequence.txt")))
    for row in rows:
        row["compile_s"] = round(seconds, 1)
        name = row["kernel"]
        ptx = [f for f in glob.glob(os.path.join(dump, "*.ptx")) if f".entry {name}(" in open(f).read()]
        if not ptx:
            row["error"] = "compiled, but the XLA dump holds no PTX for this kernel"
            continue
        if keep:
            shutil.copy(ptx[0], os.path.join(keep, f"{v.name}.{name}.ptx"))
        row.update(ptxas_resources(ptxas, ptx[0], name))
        launch = re.search(rf"\b{re.escape(name)} grid: \[(\d+).*?threads: \[(\d+).*?shared_memory: (\d+) bytes",
                           launches)
        programs, threads, dynamic = map(int, launch.groups()) if launch else (None, 128, 0)
        row.update(programs=programs, threads=threads, smem=row.get("smem", 0) + dynamic)
        if "regs" in row:
            blocks, occ, limiter = occupancy(row["regs"], threads, row["smem"])
            row["occupancy"] = f"{occ:.0%} ({blocks} blocks, {limiter})"
    return rows


def table(rows: list) -> str:
    cols = ["variant", "kernel", "compiles", "programs x threads", "regs", "spill st/ld B", "smem B", "occupancy"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ok = "yes" if "error" not in r and not r.get("verify") else f"NO: {r.get('verify') or r['error']}"
        lines.append("| " + " | ".join([
            r["variant"], r["kernel"], ok, f"{r['programs']} x {r['threads']}" if r.get("programs") else "",
            str(r.get("regs", "")),
            f"{r['spill_store']}/{r['spill_load']}" if "spill_store" in r else "",
            str(r.get("smem", "")), r.get("occupancy", ""),
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/compile_check.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--group", nargs="*", choices=sorted(GROUPS), default=["solves", "catalogue"],
                        help="groups of variants to run (see this file's docstring)")
    parser.add_argument("--variants", nargs="*", help="variant names, of any group (default: all of --group); see --list")
    parser.add_argument("--list", action="store_true", help="print the variant names of --group and exit")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--keep", help="copy each kernel's PTX into this folder")
    parser.add_argument("--launch", nargs=2, type=int, metavar=("TILE", "WARPS"),
                        help="lanes per program and warps for every kernel without block values "
                             "(default: kernels/_triton.choose_launch's for B on 132 SMs)")
    opts = parser.parse_args()
    if opts.launch:
        _triton.LAUNCH_OVERRIDE = _triton.LaunchConfig(lane_tile=opts.launch[0], num_warps=opts.launch[1])
    grouped = [v for g in opts.group for v in GROUPS[g]]
    if opts.list:
        print("\n".join(v.name for v in grouped))
        return 0
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=H100_TARGET)
    except Exception as e:  # no CUDA plugin: nothing to compile with
        print(f"cannot build a deviceless H100 ({type(e).__name__}: {e}); install jax-cuda12-pjrt "
              "matching jax (see this file's docstring)", file=sys.stderr)
        return 2
    mesh = topologies.make_mesh(topology, (1,), ("lanes",))
    site = os.path.dirname(os.path.dirname(jax.__file__))
    ptxas = os.path.join(site, "nvidia", "cuda_nvcc", "bin", "ptxas")
    ptxas = ptxas if os.path.exists(ptxas) else (shutil.which("ptxas") or "ptxas")
    import jaxlib

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, target {topology.devices[0].device_kind} "
          f"(deviceless), {time.strftime('%Y-%m-%d')}", flush=True)
    if opts.keep:
        os.makedirs(opts.keep, exist_ok=True)
    every = {v.name: v for g in GROUPS.values() for v in g}
    unknown = [name for name in opts.variants or () if name not in every]
    if unknown:
        print(f"unknown variants: {unknown}; see --list", file=sys.stderr)
        return 2
    chosen = [every[name] for name in opts.variants] if opts.variants else grouped
    rows = []
    for v in chosen:
        new = compile_variant(v, mesh, os.path.join(_DUMP, "xla"), ptxas, opts.keep)
        for r in new:
            print(f"{r['variant']} {r['kernel']}: " + (
                f"regs {r.get('regs')}, spills {r.get('spill_store')}/{r.get('spill_load')} B, {r.get('occupancy')}"
                if "error" not in r and not r["verify"] else f"FAILED: {r.get('verify') or r['error']}"), flush=True)
        rows += new
    print("\n" + table(rows))
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    failed = [r for r in rows if "error" in r or r["verify"]]
    return 1 if failed or len(rows) != 2 * len(chosen) else 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutil.rmtree(_DUMP, ignore_errors=True)
    sys.exit(code)
