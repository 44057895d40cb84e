"""tokenreduce.vllm.client (no vLLM needed): a bindable free port, /health polling that fails
clearly when the server dies or is late, a PNG data URL of the asked size."""
import base64
import io
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

from tokenreduce.vllm.client import free_port, image_data_url, wait_healthy


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_image_data_url_decodes_to_the_size_and_depends_on_the_seed():
    url = image_data_url(3, (20, 30))
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (30, 20) and img.mode == "RGB"
    assert image_data_url(3, (20, 30)) == url != image_data_url(4, (20, 30))


def test_wait_healthy_returns_once_health_answers():
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        wait_healthy(proc, server.server_address[1], timeout=10)
    finally:
        proc.kill()
        server.shutdown()


def test_wait_healthy_fails_when_the_server_exits_or_is_late():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=r"exited \(status 3\)"):
        wait_healthy(proc, free_port(), timeout=10)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError, match="not ready within 2 s"):
            wait_healthy(proc, free_port(), timeout=2)
    finally:
        proc.kill()
