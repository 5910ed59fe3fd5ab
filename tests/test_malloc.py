"""latent_dit.malloc: the command-line entry points make glibc keep freed memory, so a step that allocates the
same activations again reuses it instead of page-faulting it back in."""

import os
import subprocess
import sys

import pytest
import torch

from latent_dit import cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")

# Ten 4 MiB "activations" (10,240 pages), allocated and freed together five times, as consecutive steps do;
# prints the fewest page faults of the last three rounds. The process first sets glibc to hand every freed
# block back (a small mmap threshold, trim at 0: the worst case of its default, made deterministic), so
# without keep_freed_memory() every round faults all pages in again.
SCRIPT = """
import ctypes, resource, sys, torch
from latent_dit.malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
libc = ctypes.CDLL(None)
libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
libc.mallopt(M_TRIM_THRESHOLD, 0)
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(5):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(2**20) for _ in range(10)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(applied, min(faults[2:]))
"""


def _run(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _run("keep")
    assert applied == "True"
    assert faults < 2000  # at most a block or two of the 10,240 pages faulted in again; the rest reused
    # The control: glibc handing the blocks back faults every page in again on the next round.
    _, returned_faults = _run("returning")
    assert returned_faults > 5000


def test_glibc_settings_the_user_made_win():
    applied, faults = _run("keep", MALLOC_TRIM_THRESHOLD_="0")
    assert applied == "False"
    assert faults > 5000  # not overridden: memory is still handed back


def test_the_command_line_applies_it_before_anything_else(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept"))
    with pytest.raises(SystemExit):
        cli.main(["generate"])  # a usage error (no prompt) still comes after the allocator setting
    assert calls == ["kept"]


PEAK_RSS_SCRIPT = """
import torch
from latent_dit.malloc import peak_rss_bytes, reset_peak_rss

block = torch.ones(300 * 2**18)  # 300 MiB of float32, written, so resident
assert peak_rss_bytes() >= 300 * 2**20
del block
reset_peak_rss()
after_reset = peak_rss_bytes()
block = torch.ones(200 * 2**18)
assert peak_rss_bytes() - after_reset >= 190 * 2**20, "the new block is not counted"
del block
reset_peak_rss()
assert peak_rss_bytes() < after_reset + 100 * 2**20, "the block is still counted after the next reset"
"""


def test_peak_rss_counts_this_process_from_the_reset_on():
    # In a fresh process: in this one, the free heap earlier tests left behind can hold the new block without
    # a single new resident page.
    subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
