"""A fatal start-up error, in one line, where Kubernetes reads a container's last words.

The kubelet copies the file at `terminationMessagePath` (default /dev/termination-log) into the
pod's status (`lastState.terminated.message`), where the operator finds why a pod crash-loops.
"""

import logging
import os
from pathlib import Path

from kvpilot.serving.contract import TERMINATION_LOG

logger = logging.getLogger("kvpilot.serving.api")

MAX_MESSAGE_BYTES = 4096  # what the kubelet reads of it


def termination_log_path(setting: str | None, default: str = TERMINATION_LOG) -> Path | None:
    """The setting's path ('' for none); unset: `default` when it exists and is writable."""
    if setting is not None:
        return Path(setting) if setting else None
    path = Path(default)
    return path if path.exists() and os.access(path, os.W_OK) else None


def write_termination_reason(setting: str | None, reason: str) -> None:
    """Write `reason` as one line (whitespace folded, cut to what the kubelet reads)."""
    path = termination_log_path(setting)
    if path is None:
        return
    line = " ".join(reason.split()).encode()[: MAX_MESSAGE_BYTES - 1].decode(errors="ignore")
    try:
        path.write_text(line + "\n")
    except OSError as exc:
        logger.warning("cannot write the termination log %s: %s", path, exc)
