"""Facts about the machine a run measured, read at run time (cores, RAM, disk, kernel, library versions)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

__all__ = ["code_version", "machine_info"]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu() -> dict[str, Any]:
    model, flags = None, ""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1]
    return {
        "model": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        # A guest's first touch of a page is slow (the host backs it then); the runner primes memory for that.
        "virtualized": "hypervisor" in flags.split(),
    }


def _memory_gib() -> float:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


def _mount_of(path: str) -> dict[str, str]:
    """The /proc/mounts entry with the longest mount point that contains ``path``."""
    real = os.path.realpath(path)
    best: dict[str, str] = {}
    for line in (_read("/proc/mounts") or "").splitlines():
        device, point, fstype, options, *_ = line.split()
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best.get("point", "")):
            best = {"device": device, "point": point, "fstype": fstype, "options": options}
    return best


def _disk(path: str) -> dict[str, Any]:
    mount = _mount_of(path)
    name = os.path.basename(mount.get("device", ""))
    block = f"/sys/class/block/{name}"
    # A partition's queue and model live on its parent disk.
    parent = (
        os.path.basename(os.path.dirname(os.path.realpath(block))) if os.path.exists(f"{block}/partition") else name
    )
    queue = f"/sys/class/block/{parent}/queue"
    rotational = _read(f"{queue}/rotational")
    model = _read(f"/sys/class/block/{parent}/device/model")
    usage = os.statvfs(path)
    info: dict[str, Any] = {
        **mount,
        "disk": parent,
        "model": model,
        "rotational": None if rotational is None else rotational == "1",
        "scheduler": _read(f"{queue}/scheduler"),
        "size_gib": round(usage.f_blocks * usage.f_frsize / (1 << 30), 1),
        "free_gib": round(usage.f_bavail * usage.f_frsize / (1 << 30), 1),
    }
    # Virtual disks often report rotational=1 whatever backs them, so this is the kernel's word, not a verdict.
    kind = {True: "reported rotational", False: "reported non-rotational", None: "type unknown"}[info["rotational"]]
    info["summary"] = f"{mount.get('device', '?')} ({mount.get('fstype', '?')}, {kind}, {info['size_gib']:g} GiB)"
    return info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code_version() -> str | None:
    """The repository's commit, with ``-dirty`` when the working tree has changes (``None`` outside git)."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return described.stdout.strip() or None


def machine_info(workdir: str) -> dict[str, Any]:
    """Everything needed to interpret (or reproduce) a run's figures."""
    from fabric_ckpt.core.checksum import ACCELERATED

    return {
        "cpu": _cpu(),
        "memory_gib": round(_memory_gib(), 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "disk": _disk(workdir),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "lightning", "fabric-ckpt", "isal", "fsspec", "numpy")},
        "crc32_accelerated": ACCELERATED,
    }
