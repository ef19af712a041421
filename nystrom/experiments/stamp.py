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


def load_average():
    """The 1-, 5- and 15-minute load averages, rounded, or ``None`` where the platform has none."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def all_cores():
    """The cores this process may run on (its CPU affinity), the thread count of "all cores"."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_warning(threads, load=None):
    """A warning when the 1-minute load average exceeds the cores this process may use, else ``None``.

    The load counts the timing run itself: up to ``threads`` of it. A run on fewer threads than cores leaves room for
    the rest of the load, so the machine is shared only past its cores (a review: a one-thread run on two cores warned
    at 1.05, itself and noise, and the tables it stamped read as from a busy machine).

    Parameters
    ----------
    threads : int
        Threads the run times with; they count in the load they are judged by.
    load : float, optional
        The load average to judge; default the machine's now.
    """
    if load is None:
        loads = load_average()
        load = None if loads is None else loads[0]
    cores = all_cores()
    if load is None or load <= max(cores, threads):
        return None
    return (f"load average {load:.2f} exceeds the {cores} core{'s' if cores > 1 else ''} of this machine, the "
            f"{threads}-thread run included: other processes share the CPU and the times are inflated")


def make_stamp(device, dtype, commit=None, smoke_run=False):
    """Where and when a result was measured: device, dtype, versions, date, commit, threads, load.

    ``commit`` is that of the code that ran (taken when the run started); default the checkout's now.
    ``smoke_run`` marks a ``--quick`` run, whose sizes are too small for its numbers to mean anything.
    """
    loads = load_average()
    threads = torch.get_num_threads()
    return {
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or git_commit(),
        # Other processes on a shared machine inflate times; the load says how busy it was.
        "load_average": loads,
        "load_warning": None if loads is None or device.type != "cpu" else busy_warning(threads, loads[0]),
        "smoke_run": smoke_run,
    }


def stamp_line(stamp):
    """One-line form of a stamp for figure footers and table captions; a smoke run says so first."""
    v = stamp["versions"]
    smoke = "SMOKE RUN (--quick), not a benchmark | " if stamp.get("smoke_run") else ""
    threads = f"{stamp['threads']} thread{'' if stamp['threads'] == 1 else 's'}"
    return (f"{smoke}{stamp['device_name']} | {stamp['dtype']}, {threads} | torch {v['torch']}, "
            f"nystrom {v['nystrom']} | {stamp['date']} | commit {stamp['commit']}")


def figure_stamp(stamp):
    """A figure's footer: :func:`stamp_line`, the load average, and a busy machine's warning, as a table's caption
    has them."""
    busy = " | BUSY MACHINE: times inflated" if stamp.get("load_warning") else ""
    return f"{stamp_line(stamp)} | load average {stamp.get('load_average')}{busy}"


def caption(stamp):
    """The first lines of a results table: where, when and how busy, then a smoke run's or a busy machine's
    warning in bold."""
    lines = [f"_Measured on {stamp_line(stamp)}; load average {stamp.get('load_average')}._\n"]
    if stamp.get("smoke_run"):
        lines.append("**Smoke run (`--quick`): tiny sizes and time budgets. These numbers check that the code "
                     "runs; they are not benchmarks.**\n")
    if stamp.get("load_warning"):
        lines.append(f"**Busy machine: {stamp['load_warning']}.**\n")
    return "\n".join(lines)
