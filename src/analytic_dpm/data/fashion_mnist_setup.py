"""Fill ``ROOT/FashionMNIST/raw/`` (the layout torchvision's ``FashionMNIST`` reads) without the internet.

Debian's package ``dataset-fashion-mnist`` ships the four gzipped idx files in
``/usr/share/datasets/fashion-mnist/``; this copies and gunzips them. When they are absent and we are root
with ``apt-get`` available, it installs the package first.

    python -m analytic_dpm.data.fashion_mnist_setup ROOT [--debian-dir DIR] [--no-apt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .fashion_mnist_files import (
    DEBIAN_DIR,
    DEBIAN_PACKAGE,
    RAW_FILES,
    SETUP_COMMAND,
    debian_files_present,
    fill_raw_from_debian,
    missing_raw_files,
    raw_dir,
)

__all__ = [
    "DEBIAN_DIR",
    "DEBIAN_PACKAGE",
    "RAW_FILES",
    "debian_files_present",
    "fill_raw_from_debian",
    "install_debian_package",
    "main",
    "missing_raw_files",
    "raw_dir",
    "setup_fashion_mnist",
]


def install_debian_package(verbose: bool = True) -> bool:
    """``apt-get install -y dataset-fashion-mnist`` when root with apt-get; True on success."""
    apt = shutil.which("apt-get")
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if apt is None or not is_root:
        if verbose:
            why = "apt-get is not available" if apt is None else "not running as root"
            print(f"cannot install the Debian package {DEBIAN_PACKAGE}: {why}")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        [apt, "install", "-y", DEBIAN_PACKAGE],
        [apt, "update"],
        [apt, "install", "-y", DEBIAN_PACKAGE],
    ):
        if verbose:
            print("running:", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        if cmd[1] == "install" and rc == 0:
            return True
        if cmd[1] == "update" and rc != 0:
            break
    return False


def _instructions(root: Path, debian_dir: Path) -> str:
    return (
        f"Fashion-MNIST files are missing from {raw_dir(root)}. Either\n"
        f"  - install the Debian package (as root): apt-get install -y {DEBIAN_PACKAGE}\n"
        f"    (its files land in {debian_dir})\n"
        f"    and run: {SETUP_COMMAND} {root}\n"
        f"  - or put the four uncompressed idx files ({', '.join(RAW_FILES)}) in {raw_dir(root)}\n"
        "  - or connect to the internet and let torchvision download them (download=True)."
    )


def setup_fashion_mnist(
    root: str | os.PathLike,
    debian_dir: str | os.PathLike = DEBIAN_DIR,
    try_apt: bool = True,
    verbose: bool = True,
) -> Path:
    """Make sure ``ROOT/FashionMNIST/raw`` holds the four idx files; return that directory.

    Raises :class:`FileNotFoundError` with instructions when they cannot be provided.
    """
    root, debian_dir = Path(root).expanduser(), Path(debian_dir)
    if not missing_raw_files(root):
        if verbose:
            print(f"Fashion-MNIST already in place: {raw_dir(root)}")
        return raw_dir(root)
    if not debian_files_present(debian_dir) and try_apt:
        if verbose:
            print(f"Debian Fashion-MNIST files not found in {debian_dir}; trying to install {DEBIAN_PACKAGE}")
        install_debian_package(verbose=verbose)
    if verbose and debian_files_present(debian_dir):
        print(f"copying Fashion-MNIST from {debian_dir} to {raw_dir(root)}")
    if fill_raw_from_debian(root, debian_dir, verbose=verbose):
        if verbose:
            print(f"done: {raw_dir(root)}")
        return raw_dir(root)
    raise FileNotFoundError(_instructions(root, debian_dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=SETUP_COMMAND, description="Fill ROOT/FashionMNIST/raw/ from Debian's dataset-fashion-mnist."
    )
    p.add_argument("root", help="data root (the datamodule's `root`, e.g. the value of paths.data_dir)")
    p.add_argument(
        "--debian-dir", default=str(DEBIAN_DIR), help=f"where the gzipped idx files are ({DEBIAN_DIR})"
    )
    p.add_argument("--no-apt", action="store_true", help="never try to apt-get install the package")
    args = p.parse_args(argv)
    try:
        setup_fashion_mnist(args.root, args.debian_dir, try_apt=not args.no_apt, verbose=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
