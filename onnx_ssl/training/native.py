"""The native library's stderr and errors: :func:`native_stderr_captured` keeps what
onnxruntime-training writes to file descriptor 2 out of the terminal (into the debug log),
and :func:`ort_error_line` turns its exceptions into one line (a missing gradient names the
op and the node)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

_NO_GRADIENT = re.compile(r"has not been registered: (\S+) for node ?(.*)")
_ORT_ERROR = re.compile(r"\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : (.*)", re.S)


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Capture what the native library writes to file descriptor 2 (the gradient builder
    logs every graph transformer at INFO whatever the severity set)."""
    lines: list[str] = []
    try:
        fd = os.dup(2)
    except OSError:
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(fd, 2)
            os.close(fd)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines.extend(line for line in text.splitlines() if line.strip())
            for line in lines:
                if "[I:" not in line:
                    log.debug("onnxruntime: %s", line)


def ort_error_line(e: BaseException) -> str:
    """One line for an onnxruntime exception: a missing gradient names the op and node;
    an ORT error gives its message, anything else its last line."""
    text = str(e).strip()
    m = _NO_GRADIENT.search(text)
    if m:
        node = m.group(2).strip()
        return (
            f"ONNX Runtime has no gradient for {m.group(1)}"
            f"{f' (node {node})' if node else ''}; this model cannot be trained with "
            f"onnxruntime-training 1.19.2 (replace the op or prune without training)"
        )
    m = _ORT_ERROR.search(text)
    if m:
        return m.group(1).strip().splitlines()[0][:300]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__

