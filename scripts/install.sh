#!/usr/bin/env bash
# Installs what browservm needs on Debian 12, as root, then browservm itself
# (editable, with its test tools). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  iproute2        # ip netns, for people inspecting what browservm made
  nftables        # nft: the firewall table is installed through its JSON interface
  # browservm kernel build: Debian's kernel source and what building it takes
  linux-source-6.1
  build-essential
  bc
  flex
  bison
  libelf-dev
  libssl-dev
  cpio
  # browservm kernel inspect --extract-vmlinux: unpackers for bzImage payloads Python cannot
  # unpack itself (gzip, xz, lzma and bzip2 it can); xz-utils also unpacks the kernel source
  xz-utils
  zstd
  lz4
  # browservm image build: the golden root filesystem, written into ext4 without a loop mount
  mmdebstrap
  e2fsprogs
  # VMs under QEMU microvm (KVM where it runs guests, software emulation elsewhere)
  qemu-system-x86
  # the guest desktop's programs, also run on the host by the desktop supervisor's tests
  xvfb
  openbox
  x11vnc
  websockify
  novnc
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install.sh: installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[dev]'
