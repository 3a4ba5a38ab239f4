"""What every process of a run does before its first task: the part of the pinned numerics
(`w2s_ray.numerics`) that is a torch setting, not an environment variable. Ray runs
`setup_process` in each worker as the job's worker setup hook; the driver calls it when a run
context opens.

The setting is made when torch is imported, not by importing it here. Ray runs the hook in
every worker process of the job, and most of them never use torch: the workers Ray prestarts
at `ray.init` (one per CPU, idle until a task comes), and the actors of Ray Train (controller,
synchronization, placement-group cleaner, preemption watcher, dataset manager) and Ray Data
(split coordinator, stats, autoscaling coordinator). Importing torch costs a process about 2 s
of CPU (1.7–2.2 s measured on this 2-core CPU); the hook used to import it, so one Ray Train
student run on 2 CPUs paid it in 10 processes, 8 of which never ran torch code (per-process
CPU sampled from /proc, `bench_student_workers.py --smoke`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType


def _pin() -> None:
    """oneDNN off: convolutions as im2col + MKL GEMM, which `MKL_CBWR` pins, instead of kernels
    oneDNN picks per CPU (measured in `w2s_ray.numerics`)."""
    importlib.import_module("torch.backends.mkldnn").enabled = False


def _own_loader(spec) -> bool:
    """Whether the spec's loader is its own object (a package from source files: the path
    finder makes one per module), so that wrapping its `exec_module` touches nothing else."""
    return spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader


class _PinOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: the first time `torch` is imported it lets the import machinery load
    it as it would, then calls `_pin` before the importer gets it back."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once, and not for the lookup just below
        spec = importlib.util.find_spec("torch")
        if not _own_loader(spec):
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            _pin()

        spec.loader.exec_module = exec_module  # this spec's own loader object: nothing else changes
        return spec


def setup_process() -> None:
    """Pin torch's settings in this process: now if torch is loaded, else as soon as it is."""
    if "torch" in sys.modules:
        _pin()
    elif any(isinstance(f, _PinOnImport) for f in sys.meta_path):
        return
    elif _own_loader(importlib.util.find_spec("torch")):
        sys.meta_path.insert(0, _PinOnImport())
    else:  # torch from a zip or a custom loader: imported and pinned now, as before
        _pin()
