"""``python -m random_ltd.info``: which op backends run here, and why the others do not."""

from __future__ import annotations

import torch

from random_ltd.ops import backend_report, select_backend
from random_ltd.ops._extension import load

__all__ = ["report"]


def report() -> str:
    status = load()
    lines = [f"random_ltd extension: {'loaded (' + str(status.source) + ')' if status.loaded else 'not loaded'}"
             f"{', with CUDA' if status.has_cuda else ''}{'' if status.loaded else ': ' + str(status.reason)}",
             f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU available {torch.cuda.is_available()}"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"{device}: selected backend '{select_backend(device).NAME}'")
        for name, reasons in backend_report(device):
            lines.append(f"  {name:6s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
