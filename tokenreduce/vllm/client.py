"""Client-side helpers for a started ``tokenreduce serve`` (what the serve tests and
bench/vllm_serve_bench.py share): a free loopback port, waiting for the server's ``/health``,
a random RGB image as a PNG data URL (the ``image_url`` of an OpenAI chat message). No vLLM import."""
from __future__ import annotations

import base64
import io
import socket
import subprocess
import time
import urllib.request
from typing import Tuple

__all__ = ["free_port", "wait_healthy", "image_data_url"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Block until ``http://127.0.0.1:port/health`` answers 200; RuntimeError when ``proc`` exits
    first or ``timeout`` seconds pass."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (status {proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


def image_data_url(seed: int, size: Tuple[int, int] = (280, 360)) -> str:
    """A random ``size`` = (height, width) RGB image (numpy generator ``seed``) as a PNG data URL."""
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
