"""The kernel and golden image VMs boot, resolved on the first create that needs them: one source per
distinct image (a template's `image`), so VMs of two templates boot two images in one controller.

On a new host that builds them (minutes): each step of the build is told to every create waiting
for it as a `build` note, and `building` names the step under way (the service's /readyz).
Resolved inside a create's own task, so a request is answered at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from browservm.errors import BrowserVMError, ProbeFailed
from browservm.progress import BuildStep
from browservm.templates import Template
from browservm.vm import hops
from browservm.vm.parts import Notices
from browservm.vm.records import VmRecord
from browservm.vm.waiting import uninterrupted


@dataclass(frozen=True)
class Images:
    kernel: Path
    rootfs: Path
    disk_template: Path


class ImageSource:
    def __init__(self, resolve: Callable[[Callable[[BuildStep], None]], Images], notices: Notices) -> None:
        self._resolve = resolve  # blocking; told each build step
        self._notices = notices
        self._images: Images | None = None
        self._lock = asyncio.Lock()
        self.building: BuildStep | None = None  # the build step under way, while creates wait for it
        self._waiting: dict[str, VmRecord] = {}

    @property
    def known(self) -> bool:
        """Resolved already: a create can decide now what it needs them for."""
        return self._images is not None

    async def images(self) -> Images:
        async with self._lock:
            if self._images is None:
                loop = asyncio.get_running_loop()

                def report(step: BuildStep) -> None:  # in the build's thread: told on the event loop
                    loop.call_soon_threadsafe(self._build_step, step)
                try:
                    self._images = await uninterrupted(partial(self._resolve, report))
                finally:
                    self.building = None
            images: Images = self._images
            return images

    def _build_step(self, step: BuildStep) -> None:
        """A step of the kernel's or image's build: told to every create waiting for them."""
        self.building = None if step.name == "done" else step
        for record in list(self._waiting.values()):
            self._notices.note(record, "build", step.describe())

    async def for_vm(self, record: VmRecord) -> Images:
        """The kernel and image this VM boots (ProbeFailed at `images` if they cannot be had)."""
        self._waiting[record.vm_id] = record
        try:
            return await self.images()
        except (BrowserVMError, OSError) as exc:
            raise ProbeFailed(hops.IMAGES, str(exc)) from exc
        finally:
            del self._waiting[record.vm_id]


class ImageSources:
    """An ImageSource per image: made at the first VM of a template with that image, kept after."""

    def __init__(self, resolve: Callable[[Template, Callable[[BuildStep], None]], Images], notices: Notices) -> None:
        self._resolve = resolve  # blocking; told each build step
        self._notices = notices
        self._sources: dict[str, ImageSource] = {}

    def of(self, template: Template) -> ImageSource:
        source = self._sources.get(template.image)
        if source is None:
            source = self._sources[template.image] = ImageSource(partial(self._resolve, template), self._notices)
        return source

    def building_of(self, template: Template) -> BuildStep | None:
        """The build step under way of this template's image, while creates wait for it."""
        source = self._sources.get(template.image)
        return None if source is None else source.building

    @property
    def building(self) -> BuildStep | None:
        """A build step under way (of any image), while creates wait for it."""
        return next((source.building for source in self._sources.values() if source.building is not None), None)
