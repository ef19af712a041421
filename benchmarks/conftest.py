"""The benchmark session's header says how busy the machine is: times taken while other processes share the
cores are inflated, and the targets would be judged on them."""

import torch

from nystrom.experiments.stamp import busy_warning, load_average


def pytest_report_header(config):
    """The load average at the start, and a warning when it exceeds the cores torch times with."""
    lines = [f"load average: {load_average()}"]
    warning = busy_warning(torch.get_num_threads())
    if warning:
        lines.append(f"WARNING: {warning}")
    return lines
