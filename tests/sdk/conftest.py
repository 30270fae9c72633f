"""Starts the real `candela serve` on an ephemeral loopback port with a fresh data directory and
the embedded demo model, and hands tests an OpenAI client pointed at it."""
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("CANDELA_BIN", str(ROOT / "target" / "debug" / "candela"))


class Server:
    def __init__(self, data_dir: Path, extra_args=()):
        self.data_dir = data_dir
        env = dict(os.environ, CANDELA_LOG="info", HF_HUB_OFFLINE="1")
        env.pop("CANDELA_MODEL", None)
        self.proc = subprocess.Popen(
            [BIN, "--data-dir", str(data_dir), "serve", "--host", "127.0.0.1", "--port", "0", "--max-side", "1024",
             *extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stderr_lines = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.url = None
        self.startup_token = None
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("candela listening on "):
                self.url = line.split()[-1]
            if line.startswith("token (user `local`"):
                self.startup_token = line.split()[-1]
                break
        if not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.stderr_lines[-50:]))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def token(self, sub, scope="images:generate jobs:read", ttl="1h"):
        out = subprocess.run(
            [BIN, "--data-dir", str(self.data_dir), "token", "create", "--sub", sub, "--scope", scope, "--ttl", ttl],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def hs256(self, claims, secret=None):
        """A token made by hand (for expired / forged / malformed cases)."""
        if secret is None:
            secret = (self.data_dir / "jwt_secret").read_text().strip().encode()

        def b64(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64(json.dumps(claims).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(sig)}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("candela-data"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=server.token("alice"), max_retries=0, timeout=300)
