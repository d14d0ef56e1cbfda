"""The README's set-up on a really fresh Debian 12, where python3 is Debian's own: no pip, PEP 668.

This machine's python3 is a pyenv build that has pip and takes system-wide
installs, so running scripts/install.sh here proves little. This test builds a
minbase bookworm with mmdebstrap (git, ca-certificates and python3 added, as a
user who cloned the repository has them), clones the committed HEAD of this
repository into it and, inside the chroot, runs scripts/install.sh (twice: the
second run must print nothing), `browservm --version` found through PATH, and
the unit tests from the project's venv.

Only the bare mmdebstrap result is cached (a tarball in
~/.cache/browservm/fresh-debian, keyed by the apt sources, apt options and
packages that make it); everything after it runs anew each time.

Every step in the chroot runs in a private mount namespace of its own
(`unshare --mount --propagation private`), where a small driver binds /proc,
/sys and /dev and then enters the chroot: the mounts die with the step, so
nothing stays mounted on the host, even when the test is killed. The chroot
directory is deleted afterwards, also on failure.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from browservm.images.rootfs import SUITE, AptSources
from browservm.progress import Progress, cache_dir, exclusive
from browservm.runner import CommandRunner

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
BASE_PACKAGES = ("git", "ca-certificates", "python3")
_KEY_SCHEME = 1  # bump when the way the bare Debian is made changes
CLONE = "/root/browservm"  # where the repository is cloned, inside the chroot
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's default for root
# Proxies that pip or apt may need to reach the package indexes from here; names, never hosts.
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# pip's own configuration files, in the order pip reads them (later ones win, then PIP_* variables).
_PIP_CONFIG_FILES = (Path("/etc/xdg/pip/pip.conf"), Path("/etc/pip.conf"),
                     Path.home() / ".pip/pip.conf", Path.home() / ".config/pip/pip.conf")
_PIP_SECTIONS = ("global", "install")  # install.sh runs `pip install`, nothing else
_PIP_FILES_IN_CHROOT = Path("/etc/browservm-test/pip")  # where this machine's pip files are copied to

# Runs in a private mount namespace (under `unshare`) with this machine's Python, before the chroot:
# binds what apt, dpkg and Python need, enters the chroot and becomes the step's program.
_DRIVER = """
import os, subprocess, sys
root, cwd, *argv = sys.argv[1:]
for source in ("/proc", "/sys", "/dev"):
    subprocess.run(["mount", "--rbind", source, root + source], check=True)
os.chroot(root)
os.chdir(cwd)
os.execvp(argv[0], argv)
"""

_PYTHON_FACTS = """
import importlib.util, json, pathlib, sys, sysconfig
print(json.dumps({
    "executable": sys.executable,
    "version": list(sys.version_info[:2]),
    "externally_managed": pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").is_file(),
    "pip": importlib.util.find_spec("pip") is not None,
}))
"""


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    returncode: int
    output: str  # stdout and stderr, interleaved as the program wrote them
    seconds: float

    def explain(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        return f"{_describe(self.argv)} exited with {self.returncode} after {self.seconds:.0f}s:\n{tail}"


# --- the bare Debian, cached -----------------------------------------------------------------

def _bare_key(sources: AptSources) -> str:
    parts: list[object] = [_KEY_SCHEME, SUITE, "minbase", BASE_PACKAGES, sources.options()]
    parts += [(str(p), p.read_text()) for p in sources.files()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def bare_debian(progress: Progress) -> Path:
    """A tarball of minbase bookworm + BASE_PACKAGES, made with this machine's apt sources, once per key."""
    sources = AptSources(CommandRunner())
    cache = cache_dir("fresh-debian")
    key = _bare_key(sources)
    tarball = cache / f"{SUITE}-minbase-{key}.tar"
    with exclusive(cache / f"{SUITE}-minbase-{key}.lock", progress, "fresh Debian"):
        if tarball.is_file():
            progress.stage("cached", str(tarball))
            return tarball
        for stale in cache.glob(f"{SUITE}-minbase-*.tar"):  # made from sources no longer in use
            stale.unlink()
        partial = cache / f"{tarball.name}.partial"
        partial.unlink(missing_ok=True)
        progress.stage("mmdebstrap", f"{SUITE} minbase + {', '.join(BASE_PACKAGES)} -> {tarball}")
        # The same sources and apt options as the golden image (rootfs.py), so it reaches what the host
        # reaches; mmdebstrap in a private mount namespace of its own, so none of its mounts outlive it.
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                "mmdebstrap", "--quiet", "--variant=minbase", "--format=tar",
                "--include=" + ",".join(BASE_PACKAGES)]
        argv += [f"--aptopt={option}" for option in sources.options()]
        argv += [SUITE, str(partial), *map(str, sources.files())]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1200)
        assert done.returncode == 0, f"mmdebstrap failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        os.replace(partial, tarball)
        return tarball


# --- this machine's pip settings, carried into the chroot ------------------------------------

def _machine_local(value: str) -> bool:
    """A setting that names this machine's own files: a path or a file: URL."""
    return any(token.startswith(("/", "file:")) for token in value.split())


def pip_environment(root: Path, progress: Progress) -> dict[str, str]:
    """PIP_* variables for the chroot: what pip here is told, by its files and the environment.

    Files a setting names (a CA bundle, a constraints file) are copied into the chroot and the
    setting points at the copy; settings naming this machine's own directories or local indexes
    (a wheel house, file: URLs) are left out, because a fresh machine has none of them.
    """
    settings: dict[str, str] = {}
    config_files = [*_PIP_CONFIG_FILES]
    if os.environ.get("PIP_CONFIG_FILE"):
        config_files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    for path in config_files:
        if not path.is_file():
            continue
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path)
        for section in _PIP_SECTIONS:
            if parser.has_section(section):
                for name, value in parser.items(section):
                    settings["PIP_" + name.upper().replace("-", "_")] = " ".join(value.split())
    settings.update({name: value for name, value in os.environ.items() if name.startswith("PIP_")})
    settings.pop("PIP_CONFIG_FILE", None)  # read above; the chroot gets its settings as variables

    environment: dict[str, str] = {}
    for name, value in sorted(settings.items()):
        if not _machine_local(value):
            environment[name] = value
        elif Path(value).is_file():
            copy = _PIP_FILES_IN_CHROOT / f"{name.lower()}-{Path(value).name}"
            (root / copy.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(value, root / copy.relative_to("/"))
            environment[name] = str(copy)
            progress.note(f"      pip setting {name}: {value} copied into the chroot as {copy}")
        else:
            progress.note(f"      pip setting {name}={value} left out: it names this machine's own files")
    return environment


# --- running steps inside the chroot ---------------------------------------------------------

def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def processes_in(root: Path) -> list[int]:
    """Processes whose root directory is the chroot (a daemon a package started, a step left running)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == str(root):
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile, or a kernel thread
    return pids


def mounts_under(root: Path) -> list[str]:
    """Mount points at or under `root` in this (the host's) mount namespace."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


class Chroot:
    def __init__(self, root: Path, environment: dict[str, str], progress: Progress) -> None:
        self.root = root
        self.environment = environment
        self._progress = progress

    def run(self, *argv: str, cwd: str = "/", timeout: float = 600, show: bool = True) -> Step:
        """`argv` inside the chroot, in a private mount namespace that dies with it; output shown as it comes."""
        command = ["unshare", "--mount", "--propagation", "private", "--",
                   sys.executable, "-I", "-c", _DRIVER, str(self.root), cwd, *argv]
        started = time.monotonic()
        lines: list[str] = []
        # Its own session, so a timeout kills everything the step started.
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=self.environment, start_new_session=True, text=True, errors="replace") as process:
            stdout = process.stdout
            assert stdout is not None

            def read() -> None:
                for line in stdout:
                    lines.append(line.rstrip("\n"))
                    if show:
                        print(f"      | {line}", end="", flush=True)

            # A reader thread, so a daemon that keeps the pipe open cannot hold the step past its exit.
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid)
                process.wait()
                lines.append(f"[killed after {timeout:.0f}s]")
                returncode = -signal.SIGKILL
            reader.join(timeout=5)
        return Step(tuple(argv), returncode, "\n".join(lines), time.monotonic() - started)

    def must(self, *argv: str, cwd: str = "/", timeout: float = 600, show: bool = True) -> Step:
        self._progress.stage("chroot", f"{_describe(argv)}  (in {cwd})")
        step = self.run(*argv, cwd=cwd, timeout=timeout, show=show)
        assert step.returncode == 0, step.explain()
        self._progress.stage("ok", f"{step.seconds:.1f}s")
        return step


def _describe(argv: tuple[str, ...]) -> str:
    """The command on one line: an inline script shows as <script>."""
    return " ".join("<script>" if "\n" in arg else arg for arg in argv)


@pytest.fixture
def fresh_debian(tmp_path: Path) -> Iterator[Chroot]:
    progress = Progress()
    tarball = bare_debian(progress)
    root = (tmp_path / "debian").resolve()
    root.mkdir()
    try:
        progress.stage("unpack", f"{tarball.name} -> {root}")
        subprocess.run(["tar", "--extract", "--numeric-owner", "--file", str(tarball), "--directory", str(root)],
                       check=True, capture_output=True, timeout=600)
        resolv = root / "etc/resolv.conf"  # copied, not bound: the chroot resolves names as the host does
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        environment = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8",
                       **{name: os.environ[name] for name in _PROXY_VARIABLES if name in os.environ},
                       **pip_environment(root, progress)}
        yield Chroot(root, environment, progress)
    finally:
        for pid in processes_in(root):
            with contextlib.suppress(OSError):  # it may end on its own meanwhile
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                progress.note(f"      killing process {pid}, left running in the chroot: {command[:200]}")
                os.kill(pid, signal.SIGKILL)
        # Mounts live only in the steps' own namespaces; should one ever show here, deleting would
        # reach through it into the host's /dev or /sys, so stop instead.
        leftover = mounts_under(root)
        assert not leftover, f"mounts left under the chroot, not deleting it: {leftover}"
        progress.stage("delete", str(root))
        shutil.rmtree(root)


def test_readme_setup_works_on_a_fresh_debian_12(fresh_debian: Chroot) -> None:
    chroot = fresh_debian
    started = time.monotonic()

    # The point of the test: this python3 is Debian's, without pip and closed to pip (PEP 668),
    # and without python3-venv, which install.sh has to bring.
    facts = json.loads(chroot.must("python3", "-c", _PYTHON_FACTS, show=False).output)
    assert facts == {"executable": "/usr/bin/python3", "version": [3, 11], "externally_managed": True,
                     "pip": False}, facts
    venv_package = chroot.run("dpkg-query", "--show", "--showformat=${Status}", "python3-venv", show=False)
    assert "install ok installed" not in venv_package.output, "python3-venv is already in the bare Debian"

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(chroot.root / CLONE.lstrip("/"))],
                   check=True, capture_output=True, timeout=300)
    # The chroot's own git reads the clone: it is the committed HEAD, not the working tree.
    assert chroot.must("git", "-C", CLONE, "rev-parse", "HEAD", show=False).output.strip() == head

    install = chroot.must("scripts/install.sh", cwd=CLONE, timeout=2400)
    assert "python3-venv" in install.output, "install.sh did not install python3-venv"
    assert f"linked /usr/local/bin/browservm -> {CLONE}/.venv/bin/browservm" in install.output

    again = chroot.must("scripts/install.sh", cwd=CLONE, timeout=600)
    assert again.output == "", f"a second install.sh run is not quiet:\n{again.output}"

    version = chroot.must("browservm", "--version")  # found through PATH, from any directory
    assert version.output.startswith("browservm "), version.output

    # --tb=native: Debian's Python 3.11.2 fails inside pytest's own traceback formatting ("AST
    # constructor recursion depth mismatch"), which would hide the failure that is being reported.
    chroot.must(".venv/bin/python", "-m", "pytest", "tests/unit", "-q", "-p", "no:cacheprovider", "--tb=native",
                cwd=CLONE, timeout=1200)
    print(f"  fresh Debian: install.sh {install.seconds:.0f}s, second run {again.seconds:.1f}s, "
          f"all steps {time.monotonic() - started:.0f}s", file=sys.stderr)
