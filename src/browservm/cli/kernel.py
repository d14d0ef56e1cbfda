"""`browservm kernel inspect|build`: the argument parsing and output of the kernel commands."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from browservm.errors import InvalidInput
from browservm.images.kernel_build import (
    SOURCE_PACKAGE,
    WITH_IP_PNP,
    WITHOUT_IP_PNP,
    KernelBuilder,
)
from browservm.images.kernel_bzimage import PayloadDecompressor
from browservm.images.kernel_image import extract_vmlinux, read_kernel_image
from browservm.images.kernel_inspect import inspect_kernel, render_text
from browservm.progress import Progress, cache_path
from browservm.runner import CommandRunner


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kernel = commands.add_parser("kernel", help="guest kernels: inspect one, or build ours")
    actions = kernel.add_subparsers(dest="action", required=True)

    inspect = actions.add_parser("inspect", help="format, version and the options a microVM guest needs")
    inspect.add_argument("path", type=Path, metavar="PATH", help="an ELF vmlinux or a bzImage")
    inspect.add_argument("--extract-vmlinux", type=Path, metavar="OUT",
                         help="also write the ELF vmlinux (unpacked from a bzImage) to OUT")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    build = actions.add_parser("build", help=f"build our guest kernel from Debian's {SOURCE_PACKAGE}")
    build.add_argument("--without-ip-pnp", action="store_true",
                       help="leave CONFIG_IP_PNP out, as the incident's kernel did (ip= is then ignored)")
    build.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help=f"built kernels and build trees (default {cache_path('kernels')})")
    build.add_argument("--jobs", type=int, metavar="N", default=os.cpu_count() or 1,
                       help="parallel make jobs (default: the number of CPUs)")
    build.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    return _inspect(args) if args.action == "inspect" else _build(args)


def _inspect(args: argparse.Namespace) -> int:
    decompressor = PayloadDecompressor(CommandRunner())
    image = read_kernel_image(args.path, decompressor)
    report = inspect_kernel(image)
    extracted = extract_vmlinux(image, args.extract_vmlinux, decompressor) if args.extract_vmlinux else None
    if args.json:
        output = report.to_json()
        if extracted is not None:
            output["extracted_vmlinux"] = {"path": extracted.path, "release": extracted.release,
                                           "bytes": extracted.vmlinux.size}
        print(json.dumps(output, indent=2))
    else:
        print(render_text(report))
        if extracted is not None:
            print(f"\nextracted: {extracted.path} (ELF vmlinux, {extracted.vmlinux.size} bytes, "
                  f"release {extracted.release} as in the image)")
    return 0


def _build(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise InvalidInput("jobs", args.jobs, "must be 1 or more")
    runner = CommandRunner()
    builder = KernelBuilder.packaged(runner, Progress(), cache=args.cache_dir, jobs=args.jobs)
    built = builder.build(WITHOUT_IP_PNP if args.without_ip_pnp else WITH_IP_PNP)
    if args.json:
        print(json.dumps(built.to_json(), indent=2))
    elif built.cached:
        print(f"cached: {built.vmlinux}")
    else:
        print(f"built in {built.seconds:.0f} s: {built.vmlinux}")
    return 0
