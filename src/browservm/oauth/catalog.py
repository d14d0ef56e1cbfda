"""Providers as data: the catalog shipped in the package (providers.toml), extended and overridden by
the operator's file (setting `providers_file`, TOML or JSON of the same shape).

A bad entry is refused when the catalog loads, with an error naming the file, the provider and the
field (CatalogError), never half-used at a login. What the controller sends the agent for a login is
`Provider.agent_request()`: the contract's POST /v1/login body.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from browservm.guest.toolrun import FILES_ENV
from browservm.oauth.errors import CatalogError, UnknownProvider

# The desktop user's home in the image (images/rootfs.py DESKTOP_USER is "browser"): the agent accepts
# credentials files only under it.
GUEST_HOME = PurePosixPath("/home/browser")
SHIPPED = "providers.toml"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_CALLBACK = re.compile(r"any|127\.0\.0\.1:\d{1,5}|localhost:\d{1,5}")
MAX_TIMEOUT_S = 3600  # the agent's own bound
MAX_FILES_JSON = 4096  # `files` travel as one environment variable: the agent's bound on a value


def _guest_path(value: str, field: str) -> str:
    """An absolute, normalised path inside the VM: no `~`, no variables, no `..` (the VM has no shell here)."""
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise ValueError(f"{value!r} is not an absolute path inside the VM")
    if str(path) != value or ".." in path.parts or "~" in value or "$" in value:
        raise ValueError(f"{value!r} is not a plain normalised path (no ~, $VARIABLE, .., // or trailing /)")
    return value


class Provider(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    package: StrictStr = Field(description="the npm package the oauth image installs for it (or browservm)")
    command: list[StrictStr] = Field(min_length=1, max_length=64, description="argv inside the VM")
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict, max_length=64)
    browser: Literal["BROWSER", "xdg-open"]
    callback: StrictStr = Field(description="the tool's loopback listener: 127.0.0.1:PORT or any")
    credentials: list[StrictStr] = Field(min_length=1, max_length=16)
    required_keys: list[StrictStr] = Field(default_factory=list, max_length=64)
    timeout_s: StrictInt = Field(ge=1, le=MAX_TIMEOUT_S)
    files: dict[StrictStr, StrictStr] = Field(
        default_factory=dict, max_length=16,
        description="written (0600, as the desktop user) before the tool starts: {absolute path: text}")
    template: StrictStr | None = Field(None, description="the template the login's VM is made from (its image "
                                                         "and size); default: the controller's default template "
                                                         "with login_mem_mib")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if _NAME.fullmatch(value) is None:
            raise ValueError("1-64 lowercase letters, digits, '.', '_', '-'")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        _guest_path(value[0], "command")
        for word in value:
            if not word or "\0" in word or len(word) > 4096:
                raise ValueError("each word 1-4096 characters, no NUL")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, word in value.items():
            if _ENV_NAME.fullmatch(name) is None:
                raise ValueError(f"{name[:64]!r} is not a variable name")
            if name == FILES_ENV:
                raise ValueError(f"{FILES_ENV} is the runner's: give the files as `files`")
            if "\0" in word or len(word) > 4096:
                raise ValueError(f"{name}: at most 4096 characters, no NUL")
        return value

    @field_validator("callback")
    @classmethod
    def _callback(cls, value: str) -> str:
        if _CALLBACK.fullmatch(value) is None or (value != "any" and not 1 <= int(value.rpartition(":")[2]) <= 65535):
            raise ValueError("'any' or 127.0.0.1:PORT")
        return value

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: list[str]) -> list[str]:
        for path in value:
            _guest_path(path, "credentials")
            if not PurePosixPath(path).is_relative_to(GUEST_HOME) or PurePosixPath(path) == GUEST_HOME:
                raise ValueError(f"{path!r} is not under the desktop user's home {GUEST_HOME} (the agent reads "
                                 "only there)")
        if len(set(value)) != len(value):
            raise ValueError("a path is given twice")
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: dict[str, str]) -> dict[str, str]:
        for path in value:
            _guest_path(path, "files")
            if not PurePosixPath(path).is_relative_to(GUEST_HOME) or PurePosixPath(path) == GUEST_HOME:
                raise ValueError(f"{path!r} is not under the desktop user's home {GUEST_HOME}")
        if len(_files_json(value)) > MAX_FILES_JSON:
            raise ValueError(f"at most {MAX_FILES_JSON} characters in all, as JSON")
        return value

    @model_validator(mode="after")
    def _files_are_not_credentials(self) -> Provider:
        # A file written before the tool starts that is also a credentials file would be "captured" unsigned-in.
        both = sorted(set(self.files) & set(self.credentials))
        if both:
            raise ValueError(f"files: {both[0]!r} is a credentials file; the tool must write it")
        return self

    @field_validator("required_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        if any(not key or len(key) > 256 for key in value):
            raise ValueError("each key 1-256 characters")
        return value

    def agent_request(self) -> dict[str, Any]:
        """The body of the agent's POST /v1/login (DESIGN.md, "The OAuth agent's contract"); `files` ride in
        `env` as FILES_ENV, which the guest's runner takes out and writes before it starts the tool."""
        env = dict(self.env)
        if self.files:
            env[FILES_ENV] = _files_json(self.files)
        return {"provider": self.name, "command": list(self.command), "env": env,
                "credentials": list(self.credentials), "required_keys": list(self.required_keys),
                "timeout_s": self.timeout_s}


def _files_json(files: dict[str, str]) -> str:
    return json.dumps(files, sort_keys=True, separators=(",", ":"))


class Catalog:
    """The providers by name, validated whole."""

    def __init__(self, providers: Mapping[str, Provider], sources: tuple[str, ...]) -> None:
        self.providers = dict(providers)
        self.sources = sources

    def get(self, name: str) -> Provider:
        provider = self.providers.get(name)
        if provider is None:
            raise UnknownProvider(name, sorted(self.providers))
        return provider

    def names(self) -> list[str]:
        return sorted(self.providers)


def _entries(document: object, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(document, dict) or set(document) - {"providers"}:
        raise CatalogError(source, "", "", "the file must hold one table, `providers`, of provider entries")
    entries = document.get("providers", {})
    if not isinstance(entries, dict):
        raise CatalogError(source, "", "providers", "must be a table of provider entries")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise CatalogError(source, str(name), "", "must be a table of fields")
    return entries


def _parse(text: str, source: str, suffix: str) -> dict[str, dict[str, Any]]:
    try:
        document = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(source, "", "", f"not valid {'JSON' if suffix == '.json' else 'TOML'}: {exc}") from None
    return _entries(document, source)


def _validate(name: str, entry: dict[str, Any], source: str) -> Provider:
    try:
        return Provider.model_validate({**entry, "name": name})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise CatalogError(source, name, field, first["msg"].removeprefix("Value error, ")) from None


def load_catalog(operator_file: Path | None = None) -> Catalog:
    """The shipped catalog, with the operator's file on top. Blocking (reads files)."""
    shipped_text = resources.files("browservm.oauth").joinpath(SHIPPED).read_text()
    entries = _parse(shipped_text, f"browservm/oauth/{SHIPPED}", ".toml")
    sources: tuple[str, ...] = (f"browservm/oauth/{SHIPPED}",)
    origin = dict.fromkeys(entries, sources[0])
    if operator_file is not None:
        source = str(operator_file)
        try:
            text = operator_file.read_text()
        except OSError as exc:
            raise CatalogError(source, "", "", f"cannot read it: {exc.strerror}") from None
        for name, override in _parse(text, source, operator_file.suffix.lower()).items():
            base = entries.get(name, {})
            merged = {**base, **override}
            if "env" in base and "env" in override and isinstance(override["env"], dict):
                merged["env"] = {**base["env"], **override["env"]}
            entries[name] = merged
            origin[name] = source
        sources += (source,)
    return Catalog({name: _validate(name, entry, origin[name]) for name, entry in entries.items()}, sources)
