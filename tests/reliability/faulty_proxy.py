"""A TCP proxy in front of a real S3 server that can cut checkpoint uploads half-way (for fault tests)."""

from __future__ import annotations

import re
import socket
import threading

from tread_scale.devtools.local_s3 import HOST, free_port


class CuttingProxy:
    """Relays 127.0.0.1:``port`` to ``upstream_port``; a connection whose request line ``should_cut`` selects
    is closed after ``cut_after`` bytes of that request (an upload cut off half-way).

    Args:
        upstream_port: The real server's port.
        should_cut: Called with each request line (``PUT /bucket/key HTTP/1.1``); True cuts it.
        cut_after: Bytes of the request let through before the connection is closed.
    """

    def __init__(self, upstream_port: int, should_cut, cut_after: int = 64 * 1024):
        self.upstream = upstream_port
        self.should_cut = should_cut
        self.cut_after = cut_after
        self.cuts = 0
        self.port = free_port()
        self._server = socket.create_server((HOST, self.port))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.upstream))
            threading.Thread(target=self._client_to_upstream, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _client_to_upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        budget = None
        try:
            while data := client.recv(65536):
                if budget is None:
                    for line in re.findall(rb"^[A-Z]+ \S+ HTTP/1\.1", data[:8192], re.M):
                        if self.should_cut(line.decode()):
                            budget = self.cut_after
                            break
                if budget is not None:
                    upstream.sendall(data[:budget])
                    budget -= len(data)
                    if budget <= 0:
                        self.cuts += 1
                        break
                else:
                    upstream.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
