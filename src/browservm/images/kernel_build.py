"""`browservm kernel build`: a microVM guest kernel from Debian's linux-source package.

Steps, each named in progress output and errors:

    extract       unpack /usr/src/linux-source-6.1.tar.xz into a build tree (once per tree)
    tinyconfig    start from the smallest config
    merge         add our fragment (microvm.config), then the variant's overrides
    olddefconfig  settle every other option
    check-config  every option the fragment and variant ask for must have survived: olddefconfig
                  silently drops an option whose dependencies are missing
    vmlinux       make vmlinux (minutes the first time; a variant toggle only relinks)
    verify        the result is an ELF vmlinux whose embedded config is the .config we made
    store         copy it into the cache

The cache key is a hash of the source package's name and version, the fragment
and the variant, so a second call returns at once. Build trees are kept, one per
(source version, fragment): variants are made by toggling options in the same
tree, which relinks in seconds, while a fresh or copied tree rebuilds everything.
A lock on the tree keeps two builds from sharing it at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from browservm.errors import CommandFailed, KernelBuildError, KernelConfigDropped
from browservm.images.kernel_bzimage import PayloadDecompressor
from browservm.images.kernel_config import KernelConfig, embedded_config, mismatches
from browservm.images.kernel_image import ELF, read_kernel_image
from browservm.progress import Progress, cache_dir, exclusive
from browservm.runner import CommandRunner

SOURCE_PACKAGE = "linux-source-6.1"
ARCH = "x86_64"
_KEY_SCHEME = 1  # bump when the build steps change what a key's kernel would be


def default_cache_dir() -> Path:
    return cache_dir("kernels")


@dataclass(frozen=True)
class Fragment:
    name: str
    text: str

    @classmethod
    def packaged(cls) -> Fragment:
        return cls("microvm.config", resources.files("browservm.images").joinpath("microvm.config").read_text())

    @property
    def config(self) -> KernelConfig:
        return KernelConfig.parse(self.text)


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: str  # config fragment text applied after the base fragment

    @property
    def config(self) -> KernelConfig:
        return KernelConfig.parse(self.overrides)


WITH_IP_PNP = Variant("ip-pnp", "")
# The incident's kernel: `ip=` is ignored and only the guest's own configurator brings eth0 up.
WITHOUT_IP_PNP = Variant("no-ip-pnp", "# CONFIG_IP_PNP is not set\n")


@dataclass(frozen=True)
class KernelSource:
    package: str
    version: str
    tarball: Path

    @classmethod
    def installed(cls, runner: CommandRunner, package: str = SOURCE_PACKAGE) -> KernelSource:
        tarball = Path("/usr/src") / f"{package}.tar.xz"
        try:
            version = runner.output(["dpkg-query", "-W", "-f=${Version}", package]).decode().strip()
        except CommandFailed as exc:
            raise KernelBuildError("source", f"the Debian package {package} is not installed "
                                             f"(scripts/install.sh installs it): {exc}") from exc
        if not tarball.is_file():
            raise KernelBuildError("source", f"{package} {version} is installed but {tarball} is missing")
        return cls(package, version, tarball)


def _digest(*parts: str) -> str:
    return hashlib.sha256(json.dumps([_KEY_SCHEME, *parts]).encode()).hexdigest()[:16]


def tree_key(source: KernelSource, fragment: Fragment) -> str:
    return _digest(source.package, source.version, fragment.text)


def kernel_key(source: KernelSource, fragment: Fragment, variant: Variant) -> str:
    return _digest(source.package, source.version, fragment.text, variant.name, variant.overrides)


@dataclass(frozen=True)
class BuiltKernel:
    vmlinux: Path
    config: Path
    key: str
    variant: str
    release: str
    source_package: str
    source_version: str
    cached: bool
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "vmlinux": str(self.vmlinux), "config": str(self.config)}


class KernelCache:
    """<root>/<version>-<variant>-<key>/{vmlinux,config,build.json}, and the build trees under <root>/trees/."""

    MANIFEST = "build.json"

    def __init__(self, root: Path) -> None:
        self.root = root

    def kernel_dir(self, source: KernelSource, variant: Variant, key: str) -> Path:
        return self.root / f"{source.version}-{variant.name}-{key}"

    def tree_dir(self, source: KernelSource, fragment: Fragment) -> Path:
        return self.root / "trees" / f"{source.package}-{source.version}-{tree_key(source, fragment)}"

    def lookup(self, directory: Path) -> BuiltKernel | None:
        manifest = directory / self.MANIFEST
        if not (manifest.is_file() and (directory / "vmlinux").is_file()):
            return None
        fields = json.loads(manifest.read_text())
        return BuiltKernel(**{**fields, "vmlinux": directory / "vmlinux", "config": directory / "config",
                              "cached": True})

    def store(self, directory: Path, vmlinux: Path, config: Path, built: BuiltKernel) -> BuiltKernel:
        """Copy in, then write the manifest last: a directory without one is not a cached kernel."""
        directory.mkdir(parents=True, exist_ok=True)
        for source, name in ((vmlinux, "vmlinux"), (config, "config")):
            partial = directory / f".{name}.partial"
            shutil.copyfile(source, partial)
            partial.replace(directory / name)
        stored = BuiltKernel(**{**asdict(built), "vmlinux": directory / "vmlinux", "config": directory / "config"})
        manifest = {key: value for key, value in stored.to_json().items()
                    if key not in ("vmlinux", "config", "cached")}
        (directory / f".{self.MANIFEST}.partial").write_text(json.dumps(manifest, indent=2) + "\n")
        (directory / f".{self.MANIFEST}.partial").replace(directory / self.MANIFEST)
        return stored


class KernelBuilder:
    def __init__(self, cache: KernelCache, source: KernelSource, fragment: Fragment, runner: CommandRunner,
                 progress: Progress, *, jobs: int) -> None:
        self._cache = cache
        self._source = source
        self._fragment = fragment
        self._runner = runner
        self._progress = progress
        self._jobs = jobs

    @classmethod
    def packaged(cls, runner: CommandRunner, progress: Progress, *, cache: Path | None = None,
                 jobs: int | None = None) -> KernelBuilder:
        """Our fragment on the installed linux-source, cached in `cache` (default: the user's cache)."""
        return cls(KernelCache(cache or default_cache_dir()), KernelSource.installed(runner), Fragment.packaged(),
                   runner, progress, jobs=jobs or os.cpu_count() or 1)

    def build(self, variant: Variant) -> BuiltKernel:
        key = kernel_key(self._source, self._fragment, variant)
        target = self._cache.kernel_dir(self._source, variant, key)
        cached = self._cache.lookup(target)
        if cached is not None:
            return cached
        tree = self._cache.tree_dir(self._source, self._fragment)
        tree.mkdir(parents=True, exist_ok=True)
        self._progress.note(f"kernel build: {self._source.package} {self._source.version} + {self._fragment.name}, "
                            f"variant {variant.name} (key {key}), tree {tree}")
        with exclusive(tree / "lock", self._progress, "kernel build"):
            cached = self._cache.lookup(target)  # built by whoever held the lock before us
            if cached is not None:
                return cached
            built = self._build_in(tree, variant, key)
            self._progress.stage("store", str(target))
            stored = self._cache.store(target, tree / "src" / "vmlinux", tree / "src" / ".config", built)
        self._progress.stage("done", f"{stored.vmlinux} ({stored.vmlinux.stat().st_size / 1e6:.1f} MB)")
        return stored

    def _build_in(self, tree: Path, variant: Variant, key: str) -> BuiltKernel:
        src = tree / "src"
        (tree / "logs").mkdir(exist_ok=True)
        log = tree / "logs" / f"{variant.name}.log"
        log.write_text("")  # one log per variant and attempt: the last attempt is the one to read
        extract = not (src / "Makefile").is_file()
        self._progress.plan("the guest kernel", (("extract",) if extract else ()) + (
            "tinyconfig", "merge", "olddefconfig", "check-config", "vmlinux", "verify", "store"), log)
        if extract:
            with self._step("extract", str(self._source.tarball)):
                self._extract(tree, log)
        fragments = self._write_fragments(tree, variant)
        make = ["make", f"ARCH={ARCH}"]
        with self._step("tinyconfig"):
            self._runner.logged([*make, "tinyconfig"], log=log, cwd=src)
        with self._step("merge", " + ".join(path.name for path in fragments)):
            self._runner.logged([str(src / "scripts/kconfig/merge_config.sh"), "-m", ".config",
                                 *map(str, fragments)], log=log, cwd=src)
        with self._step("olddefconfig"):
            self._runner.logged([*make, "olddefconfig"], log=log, cwd=src)
        wanted = self._fragment.config.merged(variant.config)
        with self._step("check-config", f"{len(wanted.options)} options asked for"):
            self._check_config(wanted, src / ".config")
        with self._step("vmlinux", f"make -j{self._jobs} vmlinux (log {log})"):
            # A fixed user and host keep the banner the same wherever the kernel is built.
            self._runner.logged([*make, f"-j{self._jobs}", "vmlinux"], log=log, cwd=src,
                                env={"KBUILD_BUILD_USER": "browservm", "KBUILD_BUILD_HOST": "browservm"})
        with self._step("verify", "ELF vmlinux, embedded config == .config"):
            release = self._verify(src)
        return BuiltKernel(vmlinux=src / "vmlinux", config=src / ".config", key=key, variant=variant.name,
                           release=release, source_package=self._source.package,
                           source_version=self._source.version, cached=False, seconds=round(self._progress.elapsed, 1))

    @contextmanager
    def _step(self, name: str, detail: str = "") -> Iterator[None]:
        self._progress.stage(name, detail)
        try:
            yield
        except CommandFailed as exc:
            tail = f"\n{exc.detail}" if exc.detail else ""
            raise KernelBuildError(name, f"`{exc.command}` {exc.reason}{tail}", log=exc.log) from exc

    def _extract(self, tree: Path, log: Path) -> None:
        # Unpack beside the tree and rename at the end: an interrupted unpack never looks like a tree.
        staging = tree / "extracting"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        self._runner.logged(["tar", "-xf", str(self._source.tarball), "-C", str(staging)], log=log)
        top = [entry for entry in staging.iterdir() if entry.is_dir()]
        if len(top) != 1:
            raise KernelBuildError("extract", f"{self._source.tarball} does not hold exactly one top directory: "
                                              f"{sorted(entry.name for entry in top)}", log=str(log))
        shutil.rmtree(tree / "src", ignore_errors=True)
        top[0].rename(tree / "src")
        staging.rmdir()

    def _write_fragments(self, tree: Path, variant: Variant) -> list[Path]:
        directory = tree / "fragments"
        directory.mkdir(exist_ok=True)
        base = directory / self._fragment.name
        base.write_text(self._fragment.text)
        overrides = directory / f"variant-{variant.name}.config"
        overrides.write_text(f"# browservm kernel variant {variant.name}\n{variant.overrides}")
        return [base, overrides]

    def _check_config(self, wanted: KernelConfig, config: Path) -> None:
        dropped = mismatches(wanted, KernelConfig.parse(config.read_text()))
        if dropped:
            raise KernelConfigDropped([str(mismatch) for mismatch in dropped], str(config))

    def _verify(self, src: Path) -> str:
        vmlinux = src / "vmlinux"
        image = read_kernel_image(vmlinux, PayloadDecompressor(self._runner))
        if image.format != ELF:
            raise KernelBuildError("verify", f"{vmlinux} is a {image.format}, not an ELF vmlinux")
        embedded = embedded_config(image.vmlinux.image, str(vmlinux))
        expected = KernelConfig.parse((src / ".config").read_text())
        if embedded is None or embedded.options != expected.options:
            raise KernelBuildError("verify", f"{vmlinux} does not carry the .config it was built from "
                                             "(CONFIG_IKCONFIG): `kernel inspect` could not read it back")
        return image.release
