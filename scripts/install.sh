#!/usr/bin/env bash
# Sets browservm up on Debian 12, as root: the Debian packages it needs, then browservm itself
# (editable, with its test tools) in a virtual environment of the project's own, <repo>/.venv,
# and `browservm` on PATH through /usr/local/bin.
#
# Why a virtual environment: Debian's python3 has no pip, and refuses pip installs into the system
# (PEP 668: /usr/lib/python3.11/EXTERNALLY-MANAGED), so the system is left to apt and browservm's
# Python dependencies live in .venv. The tests run from it too: .venv/bin/python -m pytest.
#
# Safe to run again: it adds only what is missing, and a second run prints nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)
venv="$repo/.venv"
link=/usr/local/bin/browservm

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run me as root: I install Debian packages and link $link"

# One package a line, grouped by what needs it: add a package to the group that needs it,
# with a comment when the reason is not obvious.
packages=(
  # browservm itself: Python 3.11 (Debian 12's), and the virtual environment it runs in;
  # python3-venv brings pip into a new venv, ca-certificates lets that pip verify the package index
  python3
  python3-venv
  ca-certificates
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
  # (Xvnc: the full and oauth images' X and VNC server; Xvfb and x11vnc: the minimal image's)
  tigervnc-standalone-server
  xvfb
  openbox
  x11vnc
  websockify
  # the Xvnc tests read the guest's X screen and clipboard as its programs do
  xclip
  x11-utils
  # noVNC: the guests serve it, and so does the controller's viewer page (from /usr/share/novnc)
  novnc
  # the end-to-end tests open the viewer and the operator page in a real browser (Playwright)
  chromium
  # a cluster's record (browservm.cluster): browservm runs its own PostgreSQL in its state directory
  postgresql-15
)

# --- Debian packages: only the missing ones -------------------------------------------------
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  # Debian's postgresql-15 makes and starts a system-wide cluster ("main", port 5432) on install;
  # browservm starts its own, owned by it, so that one would only be a stray server and open port.
  if [[ " ${missing[*]} " == *" postgresql-15 "* ]]; then
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false  # browservm runs its own cluster" \
      > /etc/postgresql-common/createcluster.d/browservm.conf
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- the virtual environment: reused when it works, made anew when it does not ---------------
# `python3` is whichever the PATH names: Debian's on a fresh machine, a pyenv build elsewhere.
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "browservm needs Python 3.11 or later; $(command -v python3) is $(python3 --version 2>&1)"

# A venv breaks when the interpreter it was made from goes away, or when `python3 -m venv` ran
# before python3-venv was there (the directory exists, pip does not): pip answering is the test.
if [ -e "$venv" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  say "$venv does not work (no usable python or pip in it): making it anew"
  rm -rf -- "$venv"
fi
if [ ! -e "$venv" ]; then
  say "making the virtual environment $venv with $(command -v python3) ($(python3 --version 2>&1))"
  python3 -m venv "$venv" || die "python3 -m venv failed; on Debian it needs the package python3-venv"
fi

# pip is quick when nothing changed, and picks up dependencies added to pyproject.toml.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[dev]' \
  || die "pip could not install browservm into $venv (see pip's message above)"

# --- browservm on PATH -----------------------------------------------------------------------
target="$venv/bin/browservm"
[ -x "$target" ] || die "pip did not make $target"
if [ "$(readlink -- "$link" 2>/dev/null || true)" != "$target" ]; then
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    # an earlier system-wide install's script: the venv's is the one to run now
    say "replacing $link (not a link into a browservm venv)"
  fi
  mkdir -p -- "$(dirname "$link")"
  ln -sfn -- "$target" "$link"
  say "linked $link -> $target"
  found=$(command -v browservm || true)
  if [ "$found" != "$link" ]; then
    say "note: \`browservm\` on this PATH is ${found:-nothing}; $link is the one this script set up"
  fi
fi
