"""Settings: defaults, then `BROWSERVM_*` environment variables, then command-line flags."""

from __future__ import annotations

import pwd
import re
from ipaddress import IPv4Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from browservm.errors import InvalidInput
from browservm.images.rootfs import PROFILES

_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_NETNS = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PRIVATE = tuple(IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROWSERVM_", frozen=True, extra="forbid")

    state_dir: Path = Field(Path("/var/lib/browservm"), description="where durable state lives")
    netns: str | None = Field(None, description="run the VM network inside this network namespace")
    subnet: IPv4Network = Field(IPv4Network("192.168.100.0/24"), description="addresses for VMs")
    bridge: str = Field("br0", description="bridge name; larger subnets add bridges br0-1, br0-2, ...")
    uplink: str | None = Field(None, description="interface VMs reach the outside through (masquerade)")
    vmm_user: str = Field("root", description="user that owns the TAP devices (runs the VMM)")
    guest_ports: tuple[int, ...] = Field((), description="TCP ports on the gateway that VMs may reach")
    vmm: str = Field("auto", description="auto (Firecracker where it can run, else QEMU), firecracker or qemu")
    accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="QEMU's accelerator: auto (KVM only where a probe guest of the kernel runs under it to "
                            "its end, else TCG), kvm or tcg")
    kernel: Path | None = Field(None, description="guest kernel (ELF vmlinux); default: build ours")
    rootfs: Path | None = Field(None, description="golden root filesystem image; default: build ours")
    image_profile: str = Field("full", description="full (with Chromium) or minimal, when building the image")
    jailer: bool = Field(False, description="run Firecracker through its jailer, in a chroot, as the VM's own "
                                            "uid (vm_uids) or else vmm_user")
    vm_uids: bool = Field(True, description="run each VM's VMM as a uid of its own (QEMU -runas, the jailer's "
                                            "--uid), never as root")
    vm_uid_base: int = Field(0x70000000, ge=65536, le=2**32 - 2**24 - 2,
                             description="the first of the 2^24 uids VMMs run as (uid = base + the VM address's "
                                         "low 24 bits); no account needs to exist")
    desktop_path: Literal["rfb", "websockify"] = Field(
        "rfb", description="how the controller reaches a VM's desktop: rfb (straight to the VNC server on :5901) or "
                           "websockify (through the guest's websockify on :6080, the seed's way)")
    disk_mib: int = Field(4096, description="size of each VM's writable overlay disk")
    max_vms: int = Field(32, ge=1, description="VMs this host runs at most")
    max_vms_per_user: int = Field(4, ge=1, description="VMs one user may have at once")
    # The controller service (browservm serve)
    listen: str = Field("127.0.0.1:8080", description="address:port the controller's HTTP API listens on")
    log_format: Literal["text", "json"] = Field("text", description="the controller's log: text, or JSON one "
                                                "object a line (with each request's id)")
    public_url: str | None = Field(None, description="how browsers reach the controller (default http://<listen>, "
                                                     "https:// with tls_cert)")
    tls_cert: Path | None = Field(None, description="serve HTTPS (and wss) with this PEM certificate (chain); "
                                                    "needs tls_key")
    tls_key: Path | None = Field(None, description="the certificate's PEM private key, unencrypted, not readable by "
                                                   "others")
    ca_file: Path | None = Field(None, description="for the CLI's --url: trust this PEM CA (or the controller's "
                                                   "own certificate) for https, in place of the system's CAs")
    api_key: str | None = Field(None, description="the operator's API key (default: made at first start, "
                                                  "kept in <state-dir>/api.key)")
    viewer_ttl: int = Field(600, ge=10, le=86400, description="seconds a viewer link stays valid")
    audit_retention: int = Field(90 * 86400, ge=3600, le=10 * 365 * 86400,
                                 description="seconds the audit trail keeps an entry (default 90 days)")
    idle_timeout: int = Field(900, ge=10, description="seconds a VM may have no viewer before it is reaped")
    max_lifetime: int = Field(7200, ge=60, description="seconds a VM may live at most before it is reaped")
    stop_vms_on_exit: bool = Field(False, description="destroy every VM when the controller stops")
    snapshots: bool = Field(False, description="restore new VMs from a snapshot of a booted desktop (QEMU), made "
                                               "in the background at the first create; cold boots until then")
    pool: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="VMs kept restored and ready for the next requests, per template: N (the "
                                          "default template's) or TEMPLATE=N,TEMPLATE=N (implies snapshots)")
    templates: Path | None = Field(None, description="the operator's templates (TOML: [templates.NAME] vcpus, "
                                                     "mem_mib, image_profile or rootfs, desktop_path) beside "
                                                     "`default`, which these settings make")
    pool_max_age: int = Field(3600, ge=60, description="seconds before a pooled VM is replaced by a fresh one")
    pool_memory_mib: int = Field(8192, ge=256, description="VM memory the pool may hold at most")
    pool_vm_mib: int = Field(1024, ge=256, le=16384, description="memory of each pooled VM: only requests of that "
                                                                 "size (1 vCPU) are served from the pool; logins ask "
                                                                 "for login_mem_mib")
    # Logins (issue 9)
    providers_file: Path | None = Field(None, description="the operator's providers catalog (TOML or JSON), "
                                                          "on top of the one shipped in browservm/oauth")
    vault_key: SecretStr | None = Field(None, description="the credential vault's AES key, 64 hex digits (default: "
                                                          "made at first start, kept in <state-dir>/vault.key)")
    login_mem_mib: int = Field(2048, ge=256, le=16384, description="memory of a login's VM (Chromium and the tool)")
    profile_max_mib: int = Field(64, ge=1, le=256, description="the most a user's sealed browser profile "
                                                              "(profile: persistent) may take on the host, MiB")
    login_agent_wait: int = Field(90, ge=1, le=3600, description="seconds a login waits for the VM's agent to answer "
                                                                 "once the VM is ready")
    # The VMs' egress and the bridge (issue 10)
    egress_allow: Annotated[tuple[IPv4Network, ...], NoDecode] = Field(
        (), description="CIDRs VMs may reach through the uplink beyond the public internet (e.g. an internal "
                        "proxy); comma-separated")
    egress_deny: Annotated[tuple[IPv4Network, ...], NoDecode] = Field(
        (), description="CIDRs VMs may not reach through the uplink; wins over egress_allow; comma-separated")
    adopt_bridge: bool = Field(False, description="use a bridge browservm did not create (warns): it may be the "
                                                  "host's LAN bridge")

    @field_validator("egress_allow", "egress_deny", mode="before")
    @classmethod
    def _cidr_list(cls, value: object) -> object:
        # From the environment or a flag, a list is a comma-separated string.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("pool", mode="before")
    @classmethod
    def _pool(cls, value: object) -> object:
        # `4` (the default template's pool, as before templates) or `desktop=4,oauth=2`.
        if isinstance(value, int) and not isinstance(value, bool):
            return {"default": value}
        if not isinstance(value, str):
            return value
        sizes: dict[str, int] = {}
        for part in (part.strip() for part in value.split(",")):
            if not part:
                continue
            name, equals, size = part.rpartition("=")
            name = name.strip() if equals else "default"
            if not size.strip().isdigit() or not name:
                raise ValueError(f"{part!r}: each entry must be N or TEMPLATE=N, N a whole number")
            if name in sizes:
                raise ValueError(f"template {name!r} is given twice")
            sizes[name] = int(size)
        return sizes

    @field_validator("pool")
    @classmethod
    def _pool_sizes(cls, value: dict[str, int]) -> dict[str, int]:
        for name, size in value.items():
            if not 0 <= size <= 64:
                raise ValueError(f"template {name!r}: {size} is not between 0 and 64 VMs")
        return {name: size for name, size in value.items() if size}

    @property
    def pooling(self) -> bool:
        return any(self.pool.values())

    @field_validator("bridge", "uplink")
    @classmethod
    def _ifname(cls, value: str | None) -> str | None:
        if value is not None and (_IFNAME.fullmatch(value) is None or value in (".", "..")):
            raise ValueError("must be an interface name of 1-15 letters, digits, '_', '.', '-'")
        return value

    @field_validator("vmm")
    @classmethod
    def _vmm(cls, value: str) -> str:
        if value not in ("auto", "firecracker", "qemu"):
            raise ValueError("must be auto, firecracker or qemu")
        return value

    @field_validator("image_profile")
    @classmethod
    def _profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"must be one of {', '.join(PROFILES)}")
        return value

    @field_validator("providers_file", "templates")
    @classmethod
    def _providers_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("kernel", "rootfs")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        """An existing regular file, as an absolute path without links: what QEMU gets can never be
        read as one of its protocols (`nbd:...`, `file:...`) or change under it through a link."""
        if value is None:
            return None
        try:
            resolved = value.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ValueError(f"{value} does not exist") from None
        if not resolved.is_file():
            raise ValueError(f"{value} is not a regular file")
        return resolved

    @field_validator("netns")
    @classmethod
    def _netns(cls, value: str | None) -> str | None:
        if value is not None and (_NETNS.fullmatch(value) is None or value in (".", "..")):
            raise ValueError("must be 1-64 letters, digits, '_', '.', '-'")
        return value

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: IPv4Network) -> IPv4Network:
        if not 16 <= value.prefixlen <= 30:
            raise ValueError("prefix length must be between /16 and /30")
        if not any(value.subnet_of(private) for private in _PRIVATE):
            raise ValueError("must be private unicast space (RFC 1918: inside 10.0.0.0/8, 172.16.0.0/12 or "
                             "192.168.0.0/16): VMs must not take addresses someone else routes")
        return value

    @field_validator("guest_ports")
    @classmethod
    def _ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port")
        return tuple(sorted(set(value)))

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be ADDRESS:PORT, for example 127.0.0.1:8080 (port 0: any free port)")
        return value

    @property
    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        # InvalidInput (a ValueError) names its field: load_settings passes it on as it is.
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise InvalidInput(missing, None, f"{_flag(given)} needs {_flag(missing)} too: TLS takes a certificate "
                                              "and its key")
        if self.tls_cert is not None and self.public_url is not None and not self.public_url.startswith("https://"):
            raise InvalidInput("public_url", self.public_url,
                               "must be https:// while the controller serves TLS (--tls-cert): viewer links would "
                               "send browsers to plain HTTP, which a TLS port does not answer")
        return self

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls_cert is not None else "http"
        return (self.public_url or f"{scheme}://{self.listen}").rstrip("/")

    @field_validator("vmm_user")
    @classmethod
    def _user(cls, value: str) -> str:
        try:
            pwd.getpwnam(value)
        except KeyError:
            raise ValueError(f"no such user {value!r} on this host") from None
        return value

    @property
    def vmm_ids(self) -> tuple[int, int]:
        entry = pwd.getpwnam(self.vmm_user)
        return entry.pw_uid, entry.pw_gid

    @property
    def database(self) -> Path:
        return self.state_dir / "state.sqlite3"


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment with `overrides` (None values are ignored) on top.

    A bad value becomes InvalidInput naming the field, not a pydantic traceback.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        if isinstance(error := first.get("ctx", {}).get("error"), InvalidInput):
            raise error from None  # a check of several fields, which names the one to change
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        raise InvalidInput(field, first.get("input"), first["msg"].removeprefix("Value error, ")) from None
