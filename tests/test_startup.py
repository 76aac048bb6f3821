"""The `anychip` command's start: glibc's malloc on transparent huge pages (jaxenv.restart_with_huge_pages)."""

import os
import platform
import resource
import subprocess
import sys

import pytest

from anychip.jaxenv import HUGE_PAGES_ENV, huge_pages_tunables, thp_mode

MADVISE = "always [madvise] never\n"


@pytest.mark.parametrize("environ, libc, thp, want", [
    ({}, ("glibc", "2.36"), MADVISE, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.39"), "[always] madvise never",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ("glibc", "2.36"), MADVISE, None),  # the user's choice
    ({HUGE_PAGES_ENV: "0"}, ("glibc", "2.36"), MADVISE, None),
    ({}, ("glibc", "2.31"), MADVISE, None),  # the tunable came with glibc 2.35
    ({}, ("", ""), MADVISE, None),  # musl
    ({}, ("glibc", "2.36"), "always madvise [never]\n", None),
    ({}, ("glibc", "2.36"), "", None),  # a kernel without THP
])
def test_huge_pages_only_where_glibc_and_the_kernel_have_them(environ, libc, thp, want):
    assert huge_pages_tunables(environ, libc, thp) == want


def _child_page_faults(env: dict[str, str]) -> int:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    subprocess.run([sys.executable, "-m", "anychip.cli", "bench", "model=demo", "train.batch_size=8",
                    "train.seq_len=256", "--steps", "10", "--warmup", "1"], env=env, check=True,
                   capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before


def test_the_command_runs_on_huge_pages():
    """Each demo step's ~140 MiB of XLA temporaries are fresh memory: ~35k page faults per step on 4 KiB
    pages, none to speak of on 2 MiB ones. So 11 steps fault at least twice as often without (measured:
    ~540k against ~150k, compilation included)."""
    if huge_pages_tunables({}, platform.libc_ver(), thp_mode()) is None:
        pytest.skip(f"no huge pages for malloc here ({platform.libc_ver()}, THP {thp_mode().strip()!r})")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", HUGE_PAGES_ENV)}
    with_huge = _child_page_faults(env)
    without = _child_page_faults({**env, HUGE_PAGES_ENV: "0"})
    assert with_huge < without / 2, (with_huge, without)
