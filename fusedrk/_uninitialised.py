"""Buffers whose contents are never read before they are written: the jax backend's tape.

A while loop needs an initial value for every carried buffer, so a tape written row by row
inside the loop would be filled by XLA before the loop starts. On XLA:CPU that fill is a
large share of a short adaptive solve's gradient: it writes every byte of a tape sized by
``max_steps`` (the README example: 30 MB for 55 iterations; jit(grad) 30.4 ms filled, 25.7 ms
not) and, once the computation's scratch memory is above glibc's 32 MiB mmap ceiling, the
fresh pages of every call fault in as well (the same with ``tape_rows`` a quarter of its
iterations, 50 MB of scratch: 46.8 ms filled, 31.9 ms not). On XLA:CPU, ``buffers`` therefore
makes its buffers with one custom call that does nothing: XLA allocates its outputs and
nobody writes them, so only the pages the loop writes are ever touched. On other platforms,
or where the running jaxlib does not take the call, each buffer is filled with a value of its
own (see ``_filled``).

Used by the jax backend's tape ring, checkpoints and replay ring (_reference.py) and by
AllSaveAdjoint's residual rows (_allsave.py). One cost: ``jax.export`` refuses to serialise a
computation with a custom call it has no compatibility guarantee for, so a gradient exported
with ``jax.export`` on a CPU must be traced with filled buffers: set
``fusedrk._uninitialised.USE_CUSTOM_CALL = False`` first.

Owns: the no-op XLA FFI handler (a ctypes callback, registered once per process), the probe
that decides whether it works, and the fill the tests use to prove that nothing unwritten is
read (``FILL_FOR_TESTS``).

Must not: be used for a buffer any entry of which may be read before it is written.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_TARGET = "fusedrk_uninitialised"

# Tests set this True to fill every buffer with NaN (floats), True (bools) or -1 (integers)
# instead: any result that depends on an unwritten entry then changes.
FILL_FOR_TESTS: Optional[bool] = None
# Smaller requests are filled: a fill this size costs less than the call (AllSaveAdjoint makes
# small buffers inside every step for its loop over save times: 1.9 ms per gradient filled,
# 5.2 ms through the call, 20-component Van der Pol).
MIN_BYTES = 2**20
# False: never use the custom call (always fill), e.g. before ``jax.export``.
USE_CUSTOM_CALL = True

# XLA FFI C structures, only as far as the handler reads them (xla/ffi/api/c_api.h).
_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                           ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _CallFrame(ctypes.Structure):  # the leading fields only
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase))]


_HANDLER_TYPE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


def _handler(frame):
    """XLA_FFI_Handler: answer XLA's metadata query (API version 0.1, the oldest FFI version
    XLA accepts, no traits); otherwise do nothing and report success (NULL)."""
    ext = frame.contents.extension_start
    while ext:
        if ext.contents.type == _METADATA_EXTENSION:
            metadata = ctypes.cast(ext, ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
            metadata.api_version.major_version = 0
            metadata.api_version.minor_version = 1
            metadata.traits = 0
            return None
        ext = ext.contents.next
    return None


_callback = _HANDLER_TYPE(_handler)  # module-level: XLA keeps a raw pointer to it
_works: Optional[bool] = None


def _custom_call_works() -> bool:
    """Register the handler and run it once; False (use filled buffers) if anything fails."""
    global _works
    if _works is None:
        try:
            capsule = jax.ffi.pycapsule(ctypes.cast(_callback, ctypes.c_void_p).value)
            jax.ffi.register_ffi_target(_TARGET, capsule, platform="cpu")
            # Compiled and run now, also when first called while a solve is being traced.
            probe = jax.jit(lambda: _custom_call([((3,), jnp.float32), ((2, 2), jnp.int32)]))
            out = jax.block_until_ready(probe.lower().compile()())
            _works = [x.shape for x in out] == [(3,), (2, 2)]
        except Exception:  # an XLA or jaxlib that does not take it: fill instead
            _works = False
    return _works


_sites = itertools.count()


def _custom_call(specs, like=()):
    shapes = [jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for shape, dtype in specs]
    # ``like`` (ignored by the handler) only tells jax.vmap to make the buffers batched: a loop
    # carry made unbatched would be broadcast, written in full, once the loop batches it.
    # ``site`` (ignored too) keeps XLA from merging two calls of one computation into one
    # buffer set, which it would then copy into each loop that carries one. It cycles so that
    # eager calls reuse a bounded number of compiled calls.
    call = jax.ffi.ffi_call(_TARGET, shapes, has_side_effect=False, vmap_method="expand_dims")
    return call(*like, site=np.int64(next(_sites) % 256))


def _filled(specs, fill=None):
    """Each buffer filled with a value of its own (``fill``, if given, for all): with one value,
    equal-shaped buffers would share one broadcast that XLA then copies into each (on the
    README example, a memset and 13 copies, 25 MB, before the loop)."""
    count = itertools.count(1)
    out = []
    for shape, dtype in specs:
        dtype = jnp.dtype(dtype)
        if fill is not None:
            value = True if dtype == jnp.bool_ else (np.nan if jnp.issubdtype(dtype, jnp.floating) else -1)
        else:
            value = next(count)
            value = value % 2 if dtype == jnp.bool_ else value
        out.append(jnp.full(shape, value, dtype))
    return out


def buffers(specs: Sequence[tuple], like: Sequence = ()) -> list:
    """Arrays of the given ``(shape, dtype)`` whose contents are unspecified. Under
    ``jax.vmap`` they are batched when any array in ``like`` is (pass the loop's inputs)."""
    specs = list(specs)
    if not specs:
        return []
    if FILL_FOR_TESTS:
        return _filled(specs, fill=True)
    small = sum(int(np.prod(shape)) * jnp.dtype(dtype).itemsize for shape, dtype in specs) < MIN_BYTES
    if USE_CUSTOM_CALL and not small and jax.default_backend() == "cpu" and _custom_call_works():
        return list(_custom_call(specs, tuple(like)))
    return _filled(specs)


def like(tree, batched_like: Sequence = ()):
    """``buffers`` shaped like every leaf (array or ``jax.ShapeDtypeStruct``) of ``tree``, in
    its structure."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, buffers([(x.shape, x.dtype) for x in leaves], batched_like))
