"""The parts of `kernel build` that need no kernel build: keys, the fragment, the cache, the source check.

The build itself runs in tests/integration/test_kernel_build.py.
"""

import io
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from browservm.cli import main
from browservm.errors import KernelBuildError
from browservm.images.kernel_build import (
    WITH_IP_PNP,
    WITHOUT_IP_PNP,
    BuiltKernel,
    Fragment,
    KernelBuilder,
    KernelCache,
    KernelSource,
    kernel_key,
    tree_key,
)
from browservm.images.kernel_inspect import OPTIONS
from browservm.progress import Progress
from browservm.runner import CommandRunner

SOURCE = KernelSource("linux-source-6.1", "6.1.192-2", Path("/usr/src/linux-source-6.1.tar.xz"))
FRAGMENT = Fragment.packaged()


def test_the_key_changes_with_source_version_fragment_and_variant() -> None:
    key = kernel_key(SOURCE, FRAGMENT, WITH_IP_PNP)
    assert key == kernel_key(SOURCE, Fragment.packaged(), WITH_IP_PNP)
    others = {
        kernel_key(replace(SOURCE, version="6.1.193-1"), FRAGMENT, WITH_IP_PNP),
        kernel_key(SOURCE, replace(FRAGMENT, text=FRAGMENT.text + "CONFIG_PCI=y\n"), WITH_IP_PNP),
        kernel_key(SOURCE, FRAGMENT, WITHOUT_IP_PNP),
    }
    assert len(others) == 3 and key not in others


def test_variants_share_one_build_tree_and_fragments_do_not() -> None:
    cache = KernelCache(Path("/cache"))
    assert cache.tree_dir(SOURCE, FRAGMENT).name == f"linux-source-6.1-6.1.192-2-{tree_key(SOURCE, FRAGMENT)}"
    assert tree_key(SOURCE, FRAGMENT) != tree_key(SOURCE, replace(FRAGMENT, text=FRAGMENT.text + "\n"))
    assert cache.kernel_dir(SOURCE, WITHOUT_IP_PNP, "k1") == Path("/cache/6.1.192-2-no-ip-pnp-k1")


def test_the_fragment_builds_in_every_option_inspect_looks_for_but_pci() -> None:
    wanted = FRAGMENT.config
    for spec in OPTIONS:
        assert wanted.value(spec.name) == ("n" if spec.name == "PCI" else "y"), spec.name
    # Read back by `kernel inspect`; no modules, so nothing needs an initramfs.
    assert (wanted.value("IKCONFIG"), wanted.value("IKCONFIG_PROC"), wanted.value("MODULES")) == ("y", "y", "n")


@pytest.mark.parametrize("option", [
    "CGROUPS", "NAMESPACES", "USER_NS", "PID_NS", "NET_NS", "SECCOMP_FILTER", "BPF_SYSCALL", "CGROUP_BPF",
    "INOTIFY_USER", "FHANDLE", "SYSVIPC", "POSIX_MQUEUE", "SHMEM", "TMPFS", "DEVTMPFS", "DEVTMPFS_MOUNT",
    "EPOLL", "TIMERFD", "SIGNALFD", "EVENTFD", "UNIX", "INET", "UNIX98_PTYS", "FUTEX", "AIO", "PROC_FS",
    "SYSFS", "OVERLAY_FS", "BINFMT_ELF", "BINFMT_SCRIPT", "MULTIUSER",
])
def test_the_fragment_has_what_systemd_xvfb_and_chromium_need(option: str) -> None:
    assert FRAGMENT.config.value(option) == "y"


def test_the_variant_without_ip_pnp_turns_off_ip_pnp_only() -> None:
    with_pnp = FRAGMENT.config.merged(WITH_IP_PNP.config)
    without = FRAGMENT.config.merged(WITHOUT_IP_PNP.config)
    assert (with_pnp.value("IP_PNP"), without.value("IP_PNP")) == ("y", "n")
    assert {k: v for k, v in with_pnp.options.items() if without.options[k] != v} == {"CONFIG_IP_PNP": "y"}


def _built(tmp_path: Path) -> BuiltKernel:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF kernel bytes")
    (tmp_path / ".config").write_text("CONFIG_IP_PNP=y\n")
    return BuiltKernel(vmlinux=tmp_path / "vmlinux", config=tmp_path / ".config", key="k1", variant="ip-pnp",
                       release="6.1.192", source_package=SOURCE.package, source_version=SOURCE.version,
                       cached=False, seconds=200.0)


def test_a_stored_kernel_is_found_again_as_cached(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path / "cache")
    target = cache.kernel_dir(SOURCE, WITH_IP_PNP, "k1")
    assert cache.lookup(target) is None
    built = _built(tmp_path)
    stored = cache.store(target, built.vmlinux, built.config, built)
    assert stored == replace(built, vmlinux=target / "vmlinux", config=target / "config")
    assert cache.lookup(target) == replace(stored, cached=True)
    assert (target / "vmlinux").read_bytes() == b"\x7fELF kernel bytes"
    assert sorted(p.name for p in target.iterdir()) == ["build.json", "config", "vmlinux"]


def test_a_kernel_without_its_manifest_is_not_cached(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path / "cache")
    target = cache.kernel_dir(SOURCE, WITH_IP_PNP, "k1")
    built = _built(tmp_path)
    cache.store(target, built.vmlinux, built.config, built)
    (target / "build.json").unlink()  # as if the store had been interrupted before its last step
    assert cache.lookup(target) is None


def test_a_source_package_that_is_not_installed_is_named() -> None:
    with pytest.raises(KernelBuildError, match=r"linux-source-0\.0 is not installed") as caught:
        KernelSource.installed(CommandRunner(), "linux-source-0.0")
    assert caught.value.step == "source"


def test_the_installed_source_package_is_found() -> None:
    source = KernelSource.installed(CommandRunner())
    assert source.package == "linux-source-6.1" and source.tarball.is_file()
    assert source.version.startswith("6.1.")


FAKE_MAKEFILE = """\
tinyconfig:
\tprintf '# CONFIG_IP_PNP is not set\\n' > .config
olddefconfig:
\t@true
vmlinux:
\t@for i in $$(seq 1 30); do echo "  CC obj$$i.o"; done
\t@echo "fs/ext4/super.c:42: error: expected ';'" >&2; exit 2
"""
# Appends the fragments, as merge_config.sh -m does, without judging them.
FAKE_MERGE = '#!/bin/sh\nshift\nconfig="$1"\nshift\ncat "$@" >> "$config"\n'


def _fake_source(tmp_path: Path) -> KernelSource:
    """A source tarball whose `make vmlinux` fails: the steps before it run for real, in seconds."""
    top = tmp_path / "tarball" / "linux-fake"
    (top / "scripts" / "kconfig").mkdir(parents=True)
    (top / "Makefile").write_text(FAKE_MAKEFILE)
    (top / "scripts" / "kconfig" / "merge_config.sh").write_text(FAKE_MERGE)
    (top / "scripts" / "kconfig" / "merge_config.sh").chmod(0o755)
    tarball = tmp_path / "linux-fake.tar.xz"
    with tarfile.open(tarball, "w:xz") as archive:
        archive.add(top, arcname="linux-fake")
    return KernelSource("linux-fake", "1.0", tarball)


def test_a_failing_make_names_the_step_shows_the_end_and_keeps_the_log(tmp_path: Path) -> None:
    stages = io.StringIO()
    cache = KernelCache(tmp_path / "cache")
    source = _fake_source(tmp_path)
    builder = KernelBuilder(cache, source, FRAGMENT, CommandRunner(), Progress(stages), jobs=1)
    with pytest.raises(KernelBuildError) as caught:
        builder.build(WITH_IP_PNP)
    error = caught.value
    log = cache.tree_dir(source, FRAGMENT) / "logs" / "ip-pnp.log"
    assert (error.step, error.log) == ("vmlinux", str(log))
    assert str(error).startswith("kernel build, vmlinux: `make ARCH=x86_64 -j1 vmlinux` exited with status 2")
    assert "fs/ext4/super.c:42: error: expected ';'" in str(error)
    assert "CC obj30.o" in str(error) and "CC obj1.o" not in str(error)  # the end of the log, not all of it
    assert "CC obj1.o" in log.read_text()
    assert [line.split()[2] for line in stages.getvalue().splitlines()[1:]] == [
        "extract", "tinyconfig", "merge", "olddefconfig", "check-config", "vmlinux"]
    assert (cache.tree_dir(source, FRAGMENT) / "src" / "Makefile").is_file()
    assert not (cache.tree_dir(source, FRAGMENT) / "extracting").exists()
    assert not cache.kernel_dir(source, WITH_IP_PNP, kernel_key(source, FRAGMENT, WITH_IP_PNP)).exists()


def test_a_second_attempt_reuses_the_extracted_tree(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path / "cache")
    source = _fake_source(tmp_path)
    for _attempt in range(2):
        stages = io.StringIO()
        with pytest.raises(KernelBuildError):
            KernelBuilder(cache, source, FRAGMENT, CommandRunner(), Progress(stages), jobs=1).build(WITHOUT_IP_PNP)
    assert "extract" not in stages.getvalue()
    assert "tinyconfig" in stages.getvalue()


def test_cli_build_refuses_zero_jobs_before_doing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "build", "--jobs", "0", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == "browservm: error: jobs: must be 1 or more (got 0)\n"
    assert not (tmp_path / "cache").exists()
