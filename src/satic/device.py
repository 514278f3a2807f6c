"""The torch device a user names (`--device`, `device=`), checked before any work is done on it."""
from __future__ import annotations

import functools
import os

import torch

from satic.errors import SaticError

CHOICES = "cpu, cuda, cuda:N or auto (cuda when there is a GPU, else cpu)"


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N' (or any device torch knows and this machine has) -> torch.device."""
    if isinstance(name, torch.device):
        device = name
    else:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise SaticError(f"unknown device {name!r}; use {CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SaticError(f"device {str(device)!r} asked for, but CUDA is not available on this machine; "
                             "use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SaticError(f"device {str(device)!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} GPU(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SaticError(f"device {str(device)!r} asked for, but MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise SaticError(f"device {str(device)!r} is not supported; use {CHOICES}")
    elif device.index not in (None, 0):  # torch takes it for the one CPU device: a typo for cuda:N, most likely
        raise SaticError(f"device {str(device)!r}: the CPU is one device, with no index; use cpu (or cuda:N for a GPU)")
    return device


@functools.lru_cache(maxsize=None)
def memory_bytes(device: torch.device) -> int | None:
    """The device's memory in bytes: a GPU's, else the machine's physical memory; None where it cannot tell
    (asked once per device: it is checked before every decode)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def beyond_memory(need: int, device: torch.device) -> str | None:
    """Where `need` bytes outgrow the device's memory, how far, for a message that refuses the work before torch
    tries to allocate it (or the machine swaps): 'N GiB, more than the M GiB of DEVICE'; else None (it fits, or
    the memory cannot be told)."""
    have = memory_bytes(device)
    if have is None or need <= have:
        return None
    return f"{need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of {device}"
