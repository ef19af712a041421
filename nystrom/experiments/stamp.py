"""Where and when a result was measured: device, dtype, library versions, date, git commit, machine load."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from nystrom import __version__


def device_name(device):
    """Human-readable processor: the GPU's name, or the CPU model from /proc/cpuinfo with core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, family, number = platform.processor() or platform.machine(), None, None
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name":
                    model = value
                elif key == "cpu family":
                    family = value
                elif key == "model":
                    number = value
                elif not line.strip() and family is not None:
                    break
    except OSError:
        pass
    detail = f" (family {family}, model {number})" if family is not None else ""
    return f"{model}{detail}, {os.cpu_count()} cores"


def git_commit():
    """``git describe --always --dirty`` of the checkout this package lies in, or ``None`` outside one."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions():
    """Versions of python, nystrom, torch, numpy, and of transformers and matplotlib where installed."""
    found = {"python": platform.python_version(), "nystrom": __version__, "torch": torch.__version__,
             "numpy": np.__version__}
    for name in ("transformers", "matplotlib"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def make_stamp(device, dtype, commit=None):
    """Where and when a result was measured: device, dtype, versions, date, commit, threads, load.

    ``commit`` is that of the code that ran (taken when the run started); default the checkout's now.
    """
    return {
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or git_commit(),
        # Other processes on a shared machine inflate times; the load says how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def stamp_line(stamp):
    """One-line form of a stamp for figure footers and table captions."""
    v = stamp["versions"]
    return (f"{stamp['device_name']} | {stamp['dtype']}, {stamp['threads']} threads | torch {v['torch']}, "
            f"nystrom {v['nystrom']} | {stamp['date']} | commit {stamp['commit']}")
