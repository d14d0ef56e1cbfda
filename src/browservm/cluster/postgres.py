"""A PostgreSQL 15 owned by browservm, kept in one directory: data, log and Unix socket; TCP only when asked.

    DIR/                  mode 0700, owned by the user the server runs as
    DIR/data/             the cluster (initdb), with browservm.conf holding browservm's settings
    DIR/postgres.log      the server's log
    DIR/.s.PGSQL.5432     the socket clients connect through (the port only names the file)

PostgreSQL refuses to run as root, so under root it runs as Debian's `postgres` user (made by
postgresql-15), which must be able to enter every directory above DIR. Clients authenticate by
`peer`: the kernel tells the server who is at the other end of the socket, and only root and the
server's own user map to the database role `browservm`. Nobody else can even reach the socket.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from browservm.cluster.errors import PostgresError
from browservm.runner import tail

BINARIES = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15
DATABASE = "browservm"
ROLE = "browservm"
PORT = 5432
_TIMEOUT = 120  # seconds for any one program; pg_ctl's own wait is 60 s
_SERVER_USER_UNDER_ROOT = "postgres"


@dataclass(frozen=True)
class _User:
    name: str
    uid: int
    gid: int
    groups: frozenset[int]
    home: str


def _user(name: str) -> _User:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PostgresError("-", "find the server's user",
                            f"no user {name!r}: Debian's postgresql-15 makes it (scripts/install.sh installs that)"
                            ) from None
    return _User(entry.pw_name, entry.pw_uid, entry.pw_gid,
                 frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)), entry.pw_dir)


def _can_enter(user: _User, path: Path) -> bool:
    st = path.stat()
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in user.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _quote(value: str) -> str:
    """A value for postgresql.conf: single-quoted, quotes doubled."""
    return "'" + value.replace("'", "''") + "'"


class Postgres:
    """browservm's PostgreSQL in `directory`. `durable=False` (tests) trades crash safety for speed."""

    def __init__(self, directory: Path, *, durable: bool = True, binaries: Path = BINARIES,
                 listen: str | None = None) -> None:
        self.directory = directory.absolute()
        self.listen = listen  # an address for the other hosts' agents (password login), or None: the socket only
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.durable = durable
        self.binaries = binaries
        self.server_user = _user(_SERVER_USER_UNDER_ROOT if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)

    @property
    def conninfo(self) -> str:
        return psycopg.conninfo.make_conninfo(host=str(self.directory), port=PORT, dbname=DATABASE, user=ROLE)

    @property
    def socket(self) -> Path:
        return self.directory / f".s.PGSQL.{PORT}"

    # --- running the server's programs as its user ---------------------------------------------

    def _program(self, step: str, program: str) -> Path:
        path = self.binaries / program
        if not os.access(path, os.X_OK):
            raise PostgresError(str(self.directory), step,
                                f"{path} is missing: install Debian's postgresql-15 (scripts/install.sh does)")
        return path

    def _run(self, step: str, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        path = self._program(step, program)
        user = self.server_user
        switch = user.uid != os.geteuid()
        environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": user.home}
        try:
            return subprocess.run([str(path), *args], capture_output=True, text=True, check=False, cwd=self.directory,
                                  env=environment, stdin=subprocess.DEVNULL, timeout=_TIMEOUT,
                                  user=user.uid if switch else None, group=user.gid if switch else None,
                                  extra_groups=sorted(user.groups) if switch else None)
        except subprocess.TimeoutExpired:
            raise PostgresError(str(self.directory), step, f"{program} did not finish in {_TIMEOUT}s") from None

    def _must(self, step: str, program: str, *args: str) -> str:
        done = self._run(step, program, *args)
        if done.returncode != 0:
            detail = tail(done.stdout + done.stderr)
            if self.log.exists():
                detail += "\n" + tail(self.log.read_text(errors="replace"), 15)
            hint = ""
            if "another postmaster" in detail or "Address already in use" in detail:
                hint = (f" (another PostgreSQL already uses the socket {self.socket}: stop it, its pid is in "
                        f"{self.socket}.lock, or choose another directory)")
            raise PostgresError(str(self.directory), step, f"{program} exited with {done.returncode}{hint}:\n{detail}")
        return done.stdout

    # --- the directory and the cluster -----------------------------------------------------------

    def _prepare_directory(self) -> None:
        user = self.server_user
        for parent in reversed(self.directory.parents):
            if parent.exists() and not _can_enter(user, parent):
                raise PostgresError(str(self.directory), "check the directory",
                                    f"the user {user.name!r} that runs PostgreSQL cannot enter {parent} "
                                    f"(mode {stat.S_IMODE(parent.stat().st_mode):o}): choose a directory it can reach")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.directory.stat()
        if st.st_uid != user.uid:
            if any(self.directory.iterdir()):
                raise PostgresError(str(self.directory), "check the directory",
                                    f"it belongs to uid {st.st_uid}, not to {user.name!r}, and is not empty")
            os.chown(self.directory, user.uid, user.gid)
        os.chmod(self.directory, 0o700)

    def _initdb(self) -> None:
        self._must("initdb", "initdb", "--pgdata", str(self.data), "--username", ROLE, "--encoding", "UTF8",
                   "--locale", "C.UTF-8", "--auth-local", "peer", "--auth-host", "reject",
                   *(() if self.durable else ("--no-sync",)))
        self._configure()

    def _configure(self) -> None:
        """browservm's settings and logins, written at every start: `listen` may differ from the last."""
        settings = {"listen_addresses": _quote(self.listen or ""), "port": str(PORT),
                    "unix_socket_directories": _quote(str(self.directory)), "unix_socket_permissions": "0700",
                    # Each front and agent holds a connection per thread that uses the record (up to ~6).
                    "max_connections": "1000"}
        if self.listen:
            settings["password_encryption"] = "'scram-sha-256'"  # noqa: S105  # a method's name
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        self._write(self.data / "browservm.conf", "".join(f"{k} = {v}\n" for k, v in settings.items()))
        conf = (self.data / "postgresql.conf").read_text()
        include = "include 'browservm.conf'"
        if include not in conf:
            self._write(self.data / "postgresql.conf", conf + f"\n{include}  # browservm's settings\n")
        # On the socket only root and the server's own user are `browservm`. Over the network (when
        # listening), only `browservm` with the cluster's password (`set_password`), from anywhere that
        # reaches the address: the address is the cluster's private network.
        hba = "local all all peer map=browservm\n"
        if self.listen:
            hba += f"host {DATABASE} {ROLE} all scram-sha-256\n"
        self._write(self.data / "pg_hba.conf", hba)
        self._write(self.data / "pg_ident.conf",
                    f"browservm root browservm\nbrowservm {self.server_user.name} browservm\n")

    def set_password(self, password: str) -> None:
        """The password other hosts' agents log in with over the network (`listen`). Sent as its SCRAM
        verifier, never as text: a failed statement is written to the server's log whole."""
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as connection:
                verifier = connection.pgconn.encrypt_password(password.encode(), ROLE.encode(), b"scram-sha-256")
                connection.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(ROLE),
                                                                              sql.Literal(verifier.decode())))
        except psycopg.Error as error:
            raise PostgresError(str(self.directory), "set the cluster's password", str(error)) from error

    def listening(self) -> list[str]:
        """The addresses the running server listens on, besides its socket."""
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as connection:
                row = connection.execute("SHOW listen_addresses").fetchone()
        except psycopg.Error as error:
            raise PostgresError(str(self.directory), "ask where it listens", str(error)) from error
        return [address.strip() for address in str(row[0] if row else "").split(",") if address.strip()]

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        os.chown(path, self.server_user.uid, self.server_user.gid)
        os.chmod(path, 0o600)

    # --- start, stop -------------------------------------------------------------------------------

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        return self._run("status", "pg_ctl", "status", "--pgdata", str(self.data)).returncode == 0

    def start(self) -> None:
        """Initialise the cluster when it is new, start it, and make the `browservm` database when missing."""
        for program in ("initdb", "pg_ctl", "postgres"):
            self._program("find PostgreSQL 15", program)
        self._prepare_directory()
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        elif self.running():
            raise PostgresError(str(self.directory), "start",
                                f"a PostgreSQL already runs on {self.data}: stop it first "
                                f"({self.binaries}/pg_ctl stop --pgdata {self.data})")
        else:
            self._configure()
        self._must("start", "pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.log), "--wait",
                   "--timeout", "60")
        try:
            with psycopg.connect(psycopg.conninfo.make_conninfo(self.conninfo, dbname="postgres"),
                                 autocommit=True) as connection:
                if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                    connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        except psycopg.Error as error:
            self.stop()
            raise PostgresError(str(self.directory), "create the database", str(error)) from error

    def stop(self) -> None:
        """Stop the server (fast: open sessions are ended); nothing when it is not running."""
        if self.running():
            self._must("stop", "pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait",
                       "--timeout", "60")


def network_conninfo(address: str) -> str:
    """How an agent on another host reaches the cluster's PostgreSQL at `address` (the password goes apart)."""
    return psycopg.conninfo.make_conninfo(host=address, port=PORT, dbname=DATABASE, user=ROLE, connect_timeout=5)


@contextlib.contextmanager
def running(directory: Path, *, durable: bool = True, listen: str | None = None) -> Iterator[Postgres]:
    """A started PostgreSQL in `directory`, stopped on the way out even after an error."""
    server = Postgres(directory, durable=durable, listen=listen)
    server.start()
    try:
        yield server
    finally:
        server.stop()
