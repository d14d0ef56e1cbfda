"""Templates: what a VM is made from, by name (issue 21).

A template names an image (a profile the controller builds, or an image file), a size (vCPUs,
memory) and the desktop path. `default` is made from the settings (image_profile or rootfs,
desktop_path; 1 vCPU, 1024 MiB), so a controller configured with none behaves as before; more come
from the operator's TOML file (setting `templates`):

    [templates.oauth]
    image_profile = "oauth"     # or: rootfs = "/srv/images/oauth.ext4"
    vcpus = 1
    mem_mib = 2048
    desktop_path = "rfb"
    egress = "none"                   # its own egress policy (egress.py); without: the host's
    egress_allow = ["10.20.0.0/16"]
    clipboard = "paste"               # both (the default), paste (into the VM only), copy (out only), none

Every field but the image may be left out (the default template's value is used; the egress
policy is the host's unless the template names one). A bad file is refused at start with an error
naming the file, the template and the field, never half-used at a create.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from browservm.egress import FIELDS as EGRESS_FIELDS
from browservm.egress import EgressPolicy
from browservm.errors import InvalidInput
from browservm.images.rootfs import PROFILES
from browservm.vm.desktop_path import PATHS
from browservm.vm.parts import Limits

if TYPE_CHECKING:
    from browservm.config import Settings

DEFAULT = "default"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_FIELDS = frozenset({"vcpus", "mem_mib", "image_profile", "rootfs", "desktop_path", "clipboard", *EGRESS_FIELDS})
# Which way a viewer's clipboard goes: into the VM (paste), out of it (copy).
CLIPBOARD = {"both": (True, True), "paste": (True, False), "copy": (False, True), "none": (False, False)}


@dataclass(frozen=True)
class Template:
    name: str
    vcpus: int = 1
    mem_mib: int = 1024
    image_profile: str | None = "full"  # built by the controller; or:
    rootfs: Path | None = None  # an image file given (then image_profile is None)
    desktop_path: str = "rfb"
    egress: EgressPolicy | None = None  # None: the host's
    clipboard: str = "both"  # a key of CLIPBOARD

    @property
    def paste(self) -> bool:
        """Whether a viewer's clipboard reaches its VMs (the proxy leaves it out of the stream otherwise)."""
        return CLIPBOARD[self.clipboard][0]

    @property
    def copy(self) -> bool:
        """Whether its VMs' clipboard reaches the viewer page (the page drops it otherwise)."""
        return CLIPBOARD[self.clipboard][1]

    @property
    def has_browser(self) -> bool:
        """Its image runs Chromium (and the profile keeper): the minimal image has neither. An image file
        given is taken to be a full one; a profile loaded into one without a keeper fails at profile.load."""
        return self.image_profile != "minimal"

    @property
    def image(self) -> str:
        """The image as a key: VMs of two templates with the same key boot the same image (and share its
        snapshots, which are keyed by the image's files)."""
        return f"file:{self.rootfs}" if self.rootfs is not None else f"profile:{self.image_profile}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vcpus": self.vcpus, "mem_mib": self.mem_mib,
                "image_profile": self.image_profile, "rootfs": None if self.rootfs is None else str(self.rootfs),
                "desktop_path": self.desktop_path,
                "egress": None if self.egress is None else self.egress.describe(), "clipboard": self.clipboard}


class Templates:
    """The templates by name; `default` always among them."""

    def __init__(self, templates: dict[str, Template]) -> None:
        if DEFAULT not in templates:
            raise ValueError("the templates need a default")
        self._templates = dict(templates)

    @classmethod
    def only(cls, template: Template) -> Templates:
        return cls({DEFAULT: replace(template, name=DEFAULT)})

    def get(self, name: str) -> Template:
        """The template of that name (InvalidInput naming `template` when there is none)."""
        found = self._templates.get(name)
        if found is None:
            raise InvalidInput("template", name, f"no such template (known: {', '.join(self.names())})")
        return found

    @property
    def default(self) -> Template:
        return self._templates[DEFAULT]

    def names(self) -> list[str]:
        return [DEFAULT, *sorted(name for name in self._templates if name != DEFAULT)]

    def __iter__(self) -> Iterator[Template]:
        return (self._templates[name] for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._templates

    def with_default(self, template: Template) -> Templates:
        """These templates with `template` as the default (the manager's desktop path changed, in tests)."""
        return Templates({**self._templates, DEFAULT: replace(template, name=DEFAULT)})


def default_template(settings: Settings) -> Template:
    """Today's settings as a template: what every VM was made from before there were templates."""
    return Template(DEFAULT, vcpus=1, mem_mib=1024,
                    image_profile=None if settings.rootfs is not None else settings.image_profile,
                    rootfs=settings.rootfs, desktop_path=settings.desktop_path)


def templates_for(settings: Settings) -> Templates:
    """`default` from the settings, and the operator's file (settings.templates) on top. Blocking (reads it)."""
    default = default_template(settings)
    if settings.templates is None:
        return Templates.only(default)
    return Templates({DEFAULT: default, **load_templates(settings.templates, default)})


def _refuse(source: Path, name: str, field: str, value: object, reason: str) -> InvalidInput:
    where = f"templates.{name}" + (f".{field}" if field else "") if name else "templates"
    return InvalidInput(where, value, f"in {source}: {reason}")


def load_templates(source: Path, default: Template) -> dict[str, Template]:
    """The templates of the operator's TOML file, each field checked (InvalidInput naming the file, the
    template and the field). A `default` in the file changes the default template's fields."""
    try:
        document = tomllib.loads(source.read_text())
    except OSError as exc:
        raise _refuse(source, "", "", str(source), f"cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _refuse(source, "", "", str(source), f"not valid TOML: {exc}") from None
    if set(document) - {"templates"} or not isinstance(document.get("templates", {}), dict):
        raise _refuse(source, "", "", sorted(document), "the file must hold one table, `templates`, of "
                                                         "template tables")
    templates: dict[str, Template] = {}
    for name, entry in document.get("templates", {}).items():
        templates[name] = _template(source, name, entry, default)
    return templates


def _template(source: Path, name: str, entry: object, default: Template) -> Template:
    if re.fullmatch(NAME_PATTERN.strip("^$"), name) is None:
        raise _refuse(source, name, "", name, "a template's name must be 1-32 lowercase letters, digits, '_' "
                                              "or '-', starting with a letter or digit")
    if not isinstance(entry, dict):
        raise _refuse(source, name, "", entry, "must be a table of fields")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise _refuse(source, name, unknown[0], entry[unknown[0]], f"not a template field (fields: "
                                                                    f"{', '.join(sorted(_FIELDS))})")
    limits = Limits()
    values: dict[str, Any] = {}
    for field, (low, high) in (("vcpus", limits.vcpus), ("mem_mib", limits.mem_mib)):
        if field in entry:
            value = entry[field]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise _refuse(source, name, field, value, f"must be a whole number between {low} and {high}")
            values[field] = value
    if "desktop_path" in entry:
        if entry["desktop_path"] not in PATHS:
            raise _refuse(source, name, "desktop_path", entry["desktop_path"], f"must be one of {', '.join(PATHS)}")
        values["desktop_path"] = entry["desktop_path"]
    if "image_profile" in entry and "rootfs" in entry:
        raise _refuse(source, name, "rootfs", entry["rootfs"], "give image_profile or rootfs, not both")
    if "image_profile" in entry:
        if entry["image_profile"] not in PROFILES:
            raise _refuse(source, name, "image_profile", entry["image_profile"],
                          f"must be one of {', '.join(PROFILES)}")
        values["image_profile"], values["rootfs"] = entry["image_profile"], None
    if "rootfs" in entry:
        values["image_profile"], values["rootfs"] = None, _image_file(source, name, entry["rootfs"])
    if "clipboard" in entry:
        if entry["clipboard"] not in CLIPBOARD:
            raise _refuse(source, name, "clipboard", entry["clipboard"], f"must be one of {', '.join(CLIPBOARD)}")
        values["clipboard"] = entry["clipboard"]
    made = replace(default, **{k: v for k, v in values.items() if k in ("clipboard", "desktop_path")})
    if not made.paste and made.desktop_path != "rfb":
        # Only the rfb path's proxy reads the viewer's messages: on websockify's, paste could not be held back.
        raise _refuse(source, name, "clipboard", made.clipboard, "a clipboard without paste needs desktop_path "
                                                                 "\"rfb\" (the proxy holds paste back there only)")
    try:
        egress = EgressPolicy.from_fields(entry)
    except InvalidInput as exc:
        raise _refuse(source, name, exc.field, exc.value, exc.reason) from None
    if egress is not None:
        values["egress"] = egress
    return replace(default, name=name, **values)


def _image_file(source: Path, name: str, value: object) -> Path:
    """An existing regular file, absolute and without links (as settings.rootfs): what QEMU is given can
    never be read as one of its protocols or change under it through a link. Relative: to the file."""
    if not isinstance(value, str) or not value:
        raise _refuse(source, name, "rootfs", value, "must be the path of an image file")
    path = Path(value) if Path(value).is_absolute() else source.parent / value
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _refuse(source, name, "rootfs", value, f"{path} does not exist") from None
    if not resolved.is_file():
        raise _refuse(source, name, "rootfs", value, f"{path} is not a regular file")
    return resolved
