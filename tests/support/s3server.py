"""A real S3 endpoint for tests: moto_server as a subprocess on 127.0.0.1, and a TCP proxy in
front of it that can refuse service for a while (a flaky network or a restarting endpoint)."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        binary = Path(sys.executable).parent / "moto_server"
        # a venv that borrows another's site-packages has no moto_server script of its own
        command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
        self.process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class FaultyProxy:
    """Forwards 127.0.0.1:port to a target. `refuse_next(n)` cuts every open connection and
    accepts-then-closes the next n new ones, which clients see as dropped connections (a
    restarting endpoint); counting connections, not seconds, makes the fault land for sure."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.down_until = 0.0
        self.to_refuse = 0
        self.refused = 0
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def outage(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds
        self._cut_open_connections()

    def refuse_next(self, n: int) -> None:
        with self.lock:
            self.to_refuse = n
        self._cut_open_connections()

    def _cut_open_connections(self) -> None:
        # pooled keep-alive connections would otherwise carry on through the fault
        with self.lock:
            victims, self.open = list(self.open), set()
        for sock in victims:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                refuse = time.monotonic() < self.down_until or self.to_refuse > 0
                if refuse:
                    self.to_refuse = max(0, self.to_refuse - 1)
                    self.refused += 1
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
