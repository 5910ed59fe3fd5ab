"""Keep freed memory inside the process (Linux, glibc) instead of handing it back to the OS between steps.

glibc returns large freed blocks to the kernel (`munmap`, or trimming the top of the heap), so the next
training step or sampling step, which allocates the same activations again, page-faults every page back
in. On the project's 2-core VM a DiT-S/2 forward took 75,000 page faults and ran 25-35% slower that way
than with the memory kept (docs/benchmarks.md). The command-line entry points (`latent-dit ...`,
`python -m latent_dit.train`) call `keep_freed_memory()` once at start; importing the package does not,
since the setting is process-wide. Environment variables the user sets for glibc win
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`).

`reset_peak_rss()` and `peak_rss_bytes()` measure this process's peak resident memory for the benchmark
scripts. They read the kernel's high-water mark of the process's own memory (VmHWM), not getrusage's
`ru_maxrss`: Linux keeps `ru_maxrss` across fork and exec, so a subprocess started by a process holding
2 GB reports at least 2 GB, whatever it used itself.
"""

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling: blocks up to this size come from the reusable heap
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of free heap instead of trimming it


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse. True if applied; False on other platforms/allocators."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def reset_peak_rss() -> None:
    """Start the peak-memory count again from the current resident size (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the resident high-water mark (Documentation/filesystems/proc.rst)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started or since `reset_peak_rss()`, in bytes."""
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    # Elsewhere getrusage is all there is (bytes on macOS, KiB on the BSDs; no `resource` module on Windows).
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024
