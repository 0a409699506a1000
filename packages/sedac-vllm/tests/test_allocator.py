"""sedac_vllm.allocator: glibc's malloc told to keep freed memory, unless the user chose an allocator."""

import platform

import pytest

from sedac_vllm.allocator import ENV, TRIM_THRESHOLD, keep_freed_memory


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_MAX_": "65536"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=1"}])
def test_a_users_malloc_settings_are_left_alone(env):
    assert keep_freed_memory(env).startswith("left as configured")


def test_a_preloaded_allocator_is_left_alone():
    assert keep_freed_memory({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}).startswith(
        "left alone (an allocator is preloaded)")


def test_glibc_is_told_to_keep_freed_memory():
    expected = "set to keep freed memory" if platform.libc_ver()[0] == "glibc" else "left alone (not glibc)"
    assert keep_freed_memory({}).startswith(expected)


def test_the_environment_form_says_the_same():
    # what the benchmark gives every engine, vanilla's too, so both sides run with the same allocator
    assert ENV == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
