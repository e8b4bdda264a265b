"""The metric kernels as the metrics call them: compiled ahead of time where built, else numba's JIT.

A job's first calls into numba cost about 0.5 s of an evaluation's 2 (numba's import, its CPU
target's set-up, each kernel loaded from its cache). ``python -m sparsitytrap.metrics``
(``make install``) builds the kernels of :mod:`.kernels` into an extension module (numba.pycc,
for this CPU) for the argument types the workflow passes them; a call with those types runs
there without importing numba. Every other call goes to the JIT-compiled kernel of the same
source, and so does every call where the module is missing or was built from another
``kernels.py``, for another CPU or another numpy (its name carries a digest of all three:
:func:`build_tag`). ``SPARSITYTRAP_KERNELS=jit`` uses the JIT kernels only.

An extension module does not check the types of its arguments (a wrong one crashes the process),
so a call is matched to its export by a key of every argument's numba type: dtype, dimensions,
layout, writability and alignment of arrays, the class of scalars.
"""

import contextlib
import hashlib
import importlib
import os
from pathlib import Path

import numpy as np

#: The kernels of :mod:`.kernels` the metrics call.
ENTRIES = (
    "centred_ranks_1d",
    "gather",
    "gather_bits",
    "halve",
    "moments",
    "pair",
    "rank_1d",
    "rank_rows",
    "scratch",
    "ssim_images",
    "ssim_tiles",
    "tile_ranks",
    "tissue_faults",
)
#: Environment variable: ``jit`` calls numba's JIT-compiled kernels only.
ENV = "SPARSITYTRAP_KERNELS"
_SOURCE = Path(__file__).with_name("kernels.py")
_recorded = None  # {(entry, key): numba signature} while recording (see :func:`recording`)
_loaded = {}  # "module": the ahead-of-time module or None, looked up once per process


def _cpu():
    """The CPU's feature flags (``/proc/cpuinfo``), or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def build_tag():
    """Digest of ``kernels.py``, this CPU's features and numpy's version (None: CPU unknown)."""
    cpu = _cpu()
    if cpu is None:
        return None
    h = hashlib.blake2s(_SOURCE.read_bytes(), digest_size=8)
    h.update(cpu.encode())
    h.update(np.__version__.encode())
    return h.hexdigest()


def module_name(tag):
    return f"_aot_{tag}"


def _aot_module():
    """The ahead-of-time module built for this source, CPU and numpy, or None."""
    if "module" not in _loaded:
        tag = None if os.environ.get(ENV) == "jit" else build_tag()
        try:
            _loaded["module"] = tag and importlib.import_module(f"{__package__}.{module_name(tag)}")
        except ImportError:
            _loaded["module"] = None
    return _loaded["module"]


def reset():
    """Forget every resolved call and the module (after a build, or a change of :data:`ENV`)."""
    _loaded.clear()
    for entry in ENTRIES:
        globals()[entry]._resolved.clear()


def _key(v):
    """What numba's type of argument ``v`` depends on (hashable)."""
    if isinstance(v, np.ndarray):
        f = v.flags
        layout = "C" if f.c_contiguous else "F" if f.f_contiguous else "A"
        return (v.dtype.str, v.ndim, layout, f.writeable, f.aligned)
    if isinstance(v, tuple):
        return tuple(_key(x) for x in v)
    if type(v) is int and not -(2**63) <= v < 2**63:
        return "uint64"  # numba types a large int otherwise
    return type(v).__qualname__


def export_name(entry, key):
    """The module's symbol of ``entry`` called with arguments of ``key``."""
    return f"{entry}__{hashlib.blake2s(repr(key).encode(), digest_size=6).hexdigest()}"


class _Kernel:
    """One entry of :mod:`.kernels`: each argument key resolved once, to an export or the JIT kernel."""

    def __init__(self, entry):
        self.entry = entry
        self._resolved = {}

    def __call__(self, *args):
        key = tuple(_key(a) for a in args)
        fn = self._resolved.get(key)
        if fn is None:
            if _recorded is not None:
                return self._record(key, args)
            module = _aot_module()
            fn = getattr(module, export_name(self.entry, key), None) if module is not None else None
            self._resolved[key] = fn = fn or self.jit()
        return fn(*args)

    def jit(self):
        return getattr(importlib.import_module(".kernels", __package__), self.entry)

    def _record(self, key, args):
        kernel = self.jit()
        out = kernel(*args)
        types = tuple(kernel.typeof_pyval(a) for a in args)
        _recorded[(self.entry, key)] = kernel.overloads[types].signature
        return out


globals().update({entry: _Kernel(entry) for entry in ENTRIES})


@contextlib.contextmanager
def recording():
    """Run the calls inside by numba's JIT and collect ``{(entry, key): signature}`` of each."""
    global _recorded
    reset()
    _recorded, calls = {}, {}
    try:
        yield calls
    finally:
        calls.update(_recorded)
        _recorded = None
        reset()


def build(calls, out_dir):
    """Compile the kernels for ``calls`` (:func:`recording`) into ``out_dir/<module>.so``; returns its path.

    Built in a temporary folder and moved into place, so that a failed build leaves nothing.
    """
    import tempfile
    import warnings

    import llvmlite.binding as ll

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba.pycc's pending deprecation
        from numba.pycc import CC
    from . import kernels

    tag = build_tag()
    if tag is None:
        raise OSError("no /proc/cpuinfo: the module could not be checked against the CPU it runs on")
    cc = CC(module_name(tag), source_module=kernels)
    cc.target_cpu = ll.get_host_cpu_name()
    for (entry, key), sig in sorted(calls.items(), key=repr):
        cc.export(export_name(entry, key), sig)(getattr(kernels, entry).py_func)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        cc.output_dir = tmp
        cc.compile()
        (built,) = Path(tmp).iterdir()
        target = Path(out_dir) / built.name
        built.replace(target)
    return target
