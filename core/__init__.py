"""The engine: compiled kernels, the weights file, the KV cache, threads.

Importing it picks the kernel build for this CPU where the package holds several (a portable
build; see core.kernel_builds), before any kernel module loads.
"""
from core import kernel_builds as _kernel_builds

_kernel_builds.install()
