"""browservm-profile-keeper: a person's Chromium profile into this VM and out of it, sealed here.

The controller keeps a user's browser profile (`profile: persistent`) only as ciphertext made in the
guest: it holds each user's key sealed, and hands it over with each request. HTTP on port 7002, the
agent's server (agent_http.py: each request carries the VM's key from the config disk, reread per
request, so a pooled VM's claim and a restore's new key count at once):

    POST /v1/profile/load   body: a sealed profile, or nothing for a new one. Chromium is stopped, the
                            profile replaces its user data directory, Chromium starts again with it.
    POST /v1/profile/save   answer: the sealed profile. Chromium is stopped first (its orderly exit,
                            which writes its cookies out) and stays down: the VM is ending.

Both carry `X-Profile-Key` (64 hex digits) and `X-Profile-Binding` (hex of the JSON [tenant, user]);
a save also `X-Profile-Limit`, the most bytes the controller keeps.

    sealed = version (1 byte) || nonce (12) || AES-256-GCM(key, nonce, tar.gz of the profile, AD)
    AD     = b"browservm-profile 1\\n" + binding

The binding ties a ciphertext to its tenant and user: another user's profile does not open under
this user's key and binding even if the files were swapped on the host.

Runs as root (it reads the config disk); the profile itself is packed and unpacked by a process of
this program run as the desktop user, so nothing a page or the person put in the profile (a link, a
name with "..") makes root read or write outside it. Only regular files and directories travel;
caches do not (EXCLUDED). Stdlib plus python3-cryptography (Debian's, in images with Chromium).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Sequence
from email.message import Message
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import IO, Any

from browservm.guest import configdisk
from browservm.guest.agent_http import AgentKey, RawRoute, Server, read_secret
from browservm.guest.desktop import BROWSER_PROFILE, CONTROL_SOCKET
from browservm.guest.markers import format_marker

PORT = 7002  # the agent has 7000, and 7001 on loopback for its opener
BIN = Path("/usr/lib/browservm/bin/browservm-profile-keeper")
MAX_SEALED = 256 << 20  # the most any controller may ask to keep; its own bound comes with each save
MAX_UNPACKED = 1 << 30  # what a profile may grow to once unpacked: a small archive cannot fill the disk
VERSION = b"\x01"
NONCE = 12
AD_PREFIX = b"browservm-profile 1\n"
# Directories Chromium rebuilds by itself: what they hold is cache, and most of a profile's bytes.
EXCLUDED = frozenset({"Cache", "Code Cache", "GPUCache", "GrShaderCache", "ShaderCache", "GraphiteDawnCache",
                      "DawnCache", "DawnGraphiteCache", "DawnWebGPUCache", "Crashpad", "BrowserMetrics",
                      "component_crx_cache", "CacheStorage", "ScriptCache", "optimization_guide_model_store",
                      "Safe Browsing", "segmentation_platform"})
_BROWSER_DEADLINE_S = 150.0  # Chromium's stop and start, under software emulation
_CHILD_DEADLINE_S = 300.0


Answer = tuple[int, "dict[str, Any] | bytes"]


class KeeperError(Exception):
    """A step failed; the message names it and goes to the controller (never a key or a byte of profile)."""


def _aesgcm(key: bytes) -> Any:
    # Started with -S (no site): Debian's packages are not on the path until asked for.
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415 - once the path has it
    return AESGCM(key)


def seal(key: bytes, binding: bytes, plaintext: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE)
    return VERSION + nonce + bytes(_aesgcm(key).encrypt(nonce, plaintext, AD_PREFIX + binding))


def unseal(key: bytes, binding: bytes, sealed: bytes) -> bytes:
    if len(sealed) < 1 + NONCE + 16 or sealed[:1] != VERSION:
        raise KeeperError("the sealed profile is not in a format this keeper reads")
    aesgcm = _aesgcm(key)
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415 - _aesgcm put it on the path
    try:
        return bytes(aesgcm.decrypt(sealed[1:1 + NONCE], sealed[1 + NONCE:], AD_PREFIX + binding))
    except InvalidTag:
        raise KeeperError("the sealed profile does not open with this user's key: altered, or another "
                          "user's") from None


# --- the desktop user's side: the profile as an archive -------------------------------------------------

def pack(profile: Path, out: IO[bytes]) -> None:
    """Write `profile` (regular files and directories, caches left out) to `out` as tar.gz."""
    # gzip's fastest level: under software emulation compressing is most of a save's time.
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as compressed, \
            tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        if not profile.is_dir():
            return
        for top, dirs, files in os.walk(profile):
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDED and not os.path.islink(os.path.join(top, d)))
            for name in sorted(files):
                path = os.path.join(top, name)
                if name.startswith("Singleton") or not os.path.isfile(path) or os.path.islink(path):
                    continue  # Chromium's lock links, sockets: of this run only
                try:
                    archive.add(path, arcname=os.path.relpath(path, profile), recursive=False)
                except FileNotFoundError:
                    continue  # gone meanwhile (Chromium is down, but a helper may still tidy up)


def unpack(archive_in: IO[bytes], profile: Path) -> int:
    """Replace `profile` with the archive's files; the number of files. Refuses links, devices, paths that
    leave the directory, and more than MAX_UNPACKED bytes."""
    staging = profile.with_name(profile.name + ".loading")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700, parents=True)
    count = total = 0
    with tarfile.open(fileobj=archive_in, mode="r|gz") as archive:
        for member in archive:
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts or not name.parts:
                raise KeeperError(f"the profile holds a path outside it: {member.name[:100]!r}")
            target = staging.joinpath(*name.parts)
            if member.isdir():
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise KeeperError(f"the profile holds something not a file: {member.name[:100]!r}")
            total += member.size
            if total > MAX_UNPACKED:
                raise KeeperError(f"the profile unpacks to over {MAX_UNPACKED} bytes")
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None  # a regular file has a stream
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as written:
                shutil.copyfileobj(source, written)
            count += 1
    shutil.rmtree(profile, ignore_errors=True)
    profile.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, profile)
    return count


# --- root's side: the HTTP routes -------------------------------------------------------------------------

class Keeper:
    def __init__(self, user: str = "browser", control: Path = CONTROL_SOCKET, program: Sequence[str] = (str(BIN),)
                 ) -> None:
        self._account = pwd.getpwnam(user)
        self._control = control
        self._program = tuple(program)
        self._busy = threading.Lock()

    @property
    def profile(self) -> Path:
        return Path(self._account.pw_dir) / BROWSER_PROFILE

    def routes(self) -> dict[tuple[str, str], RawRoute]:
        return {("POST", "/v1/profile/load"): (MAX_SEALED, self.load),
                ("POST", "/v1/profile/save"): (0, self.save)}

    def load(self, body: bytes, headers: Message) -> Answer:
        return self._one_at_a_time(lambda: self._load(body, headers))

    def save(self, body: bytes, headers: Message) -> Answer:
        return self._one_at_a_time(lambda: self._save(headers))

    def _one_at_a_time(self, work: Callable[[], Answer]) -> Answer:
        if not self._busy.acquire(blocking=False):
            return HTTPStatus.CONFLICT, {"error": "a profile is being loaded or saved already"}
        try:
            return work()
        except KeeperError as exc:
            print(format_marker("profile", state="failed", reason=str(exc)), flush=True)
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)}
        finally:
            self._busy.release()

    def _load(self, body: bytes, headers: Message) -> Answer:
        key, binding = _key_and_binding(headers)
        archive = unseal(key, binding, body) if body else b""
        self._browser("stop-browser")
        files = 0
        if archive:
            files = int(self._as_user("unpack", archive).decode() or 0)
        else:  # a new profile: Chromium starts from an empty directory
            self._as_user("clear", b"")
        self._browser("start-browser")
        print(format_marker("profile", state="loaded", files=files, sealed=len(body)), flush=True)
        return HTTPStatus.OK, {"files": files, "sealed_bytes": len(body)}

    def _save(self, headers: Message) -> Answer:
        key, binding = _key_and_binding(headers)
        limit = headers.get("X-Profile-Limit", "")
        if not limit.isdigit() or not 0 < int(limit) <= MAX_SEALED:
            raise KeeperError(f"X-Profile-Limit must be a number of bytes up to {MAX_SEALED}")
        self._browser("stop-browser")
        archive = self._as_user("pack", b"", limit=int(limit))
        sealed = seal(key, binding, archive)
        if len(sealed) > int(limit):
            raise KeeperError(f"the profile is {len(sealed)} bytes sealed, over the {limit} the controller keeps")
        print(format_marker("profile", state="saved", sealed=len(sealed)), flush=True)
        return HTTPStatus.OK, sealed

    def _browser(self, command: str) -> None:
        """Ask the desktop to stop or start Chromium; KeeperError with its answer unless it says ok."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(_BROWSER_DEADLINE_S)
                conn.connect(str(self._control))
                conn.sendall(command.encode() + b"\n")
                answer = conn.makefile("rb").readline(512).decode(errors="replace").strip()
        except OSError as exc:
            raise KeeperError(f"the desktop did not answer {command} ({exc.strerror or exc})") from None
        if not answer.startswith("ok"):
            raise KeeperError(f"the desktop answered {command} with {answer[:300]!r}")

    def _as_user(self, action: str, stdin: bytes, limit: int = 16 << 10) -> bytes:
        """Run this program's `action` on the profile as the desktop user; its output, at most `limit` bytes."""
        account = self._account
        try:
            with subprocess.Popen([*self._program, action, str(self.profile)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, user=account.pw_uid,
                                  group=account.pw_gid, extra_groups=[], cwd=account.pw_dir,
                                  env={"HOME": account.pw_dir, "PATH": "/usr/bin:/bin"}) as child:
                out, err = _exchange(child, stdin, limit)
        except OSError as exc:
            raise KeeperError(f"could not run the profile's {action} ({exc.strerror or exc})") from None
        if child.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no word"]
            raise KeeperError(f"the profile's {action} failed: {last[0][:300]}")
        return out


def _exchange(child: subprocess.Popen[bytes], stdin: bytes, limit: int) -> tuple[bytes, bytes]:
    """Feed `stdin`, read stdout up to `limit` (killing a child that writes more) and stderr's last 4 KiB."""
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(child.stderr.read()[-4096:]), daemon=True)  # type: ignore[union-attr]
    reader.start()
    writer = threading.Thread(target=_feed, args=(child.stdin, stdin), daemon=True)
    writer.start()
    out = child.stdout.read(limit + 1)
    if len(out) > limit:
        child.kill()
        child.wait()
        raise KeeperError(f"the profile packs to over the {limit} bytes the controller keeps")
    try:
        child.wait(timeout=_CHILD_DEADLINE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise KeeperError(f"the profile's work did not end within {_CHILD_DEADLINE_S:g} s") from None
    writer.join()
    reader.join()
    return out, errors[0] if errors else b""


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    except BrokenPipeError:
        pass  # the child failed early; its exit status says why
    finally:
        pipe.close()


def _key_and_binding(headers: Message) -> tuple[bytes, bytes]:
    key, binding = headers.get("X-Profile-Key", ""), headers.get("X-Profile-Binding", "")
    try:
        key_bytes, binding_bytes = bytes.fromhex(key), bytes.fromhex(binding)
    except ValueError:
        raise KeeperError("X-Profile-Key and X-Profile-Binding must be hex") from None
    if len(key_bytes) != 32:
        raise KeeperError("X-Profile-Key must be 32 bytes (64 hex digits)")
    try:
        owner = json.loads(binding_bytes)
    except ValueError:
        owner = None
    if not (isinstance(owner, list) and len(owner) == 2 and all(isinstance(part, str) for part in owner)):
        raise KeeperError("X-Profile-Binding must be the hex of a JSON [tenant, user]")
    return key_bytes, binding_bytes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browservm-profile-keeper", description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=("serve", "pack", "unpack", "clear"), default="serve")
    parser.add_argument("profile", nargs="?", type=Path, help="(pack, unpack, clear) the profile directory")
    parser.add_argument("--user", default="browser", help="the desktop's user, whose profile it is")
    parser.add_argument("--config-disk", type=Path, default=configdisk.GUEST_DEVICE)
    args = parser.parse_args(argv)
    if args.action != "serve":
        return _user_side(args.action, args.profile)
    try:
        key = AgentKey(read_secret(args.config_disk), reread=lambda: read_secret(args.config_disk))
        server = Server(("0.0.0.0", PORT), key, {}, Keeper(args.user).routes())  # noqa: S104 - the VM's own port
    except (OSError, KeyError, configdisk.ConfigDiskError) as exc:
        print(format_marker("profile", state="failed", reason=str(exc)), flush=True)
        return 1
    print(format_marker("profile", state="listening", port=PORT), flush=True)
    server.serve_forever()
    return 0


def _user_side(action: str, profile: Path | None) -> int:
    """pack, unpack and clear: as the desktop user, on its own profile, with the archive on stdin/stdout."""
    if profile is None:
        print("the profile directory is missing", file=sys.stderr)
        return 2
    try:
        if action == "pack":
            pack(profile, sys.stdout.buffer)
        elif action == "unpack":
            print(unpack(sys.stdin.buffer, profile))
        else:
            shutil.rmtree(profile, ignore_errors=True)
    except (KeeperError, OSError, tarfile.TarError, EOFError) as exc:
        print(f"{action}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
