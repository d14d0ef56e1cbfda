"""`browservm image build`: the golden root filesystem."""

from __future__ import annotations

import argparse
import json

from browservm.config import Settings
from browservm.images.rootfs import PROFILES, RootfsBuilder
from browservm.progress import Progress
from browservm.runner import CommandRunner


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    image = commands.add_parser("image", help="the golden root filesystem VMs boot from")
    actions = image.add_subparsers(dest="action", required=True)
    actions.add_parser("build", parents=[common],
                       help=f"build it with mmdebstrap (cached by content); --profile {' or '.join(PROFILES)}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    image = RootfsBuilder(CommandRunner(), Progress()).build(settings.image_profile)
    if args.json:
        print(json.dumps(image.to_json(), indent=2))
    else:
        print(f"{image.profile} image: {image.path} ({image.size_bytes / 2**20:.0f} MiB, "
              f"{len(image.packages)} packages, key {image.key})")
    return 0
