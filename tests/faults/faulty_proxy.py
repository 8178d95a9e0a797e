"""A real TCP proxy in front of a real service that drops chosen HTTP requests: network faults, not mocks.

    with FaultyProxy("127.0.0.1", 27333, drop=lambda method, path: path.endswith("/manifest.json")) as proxy:
        settings = with_overrides(settings, {"s3": {"endpoint": proxy.url}})
        ...                                   # proxy.dropped lists the (method, path) of each request cut
    proxy.drop = lambda method, path: True    # the service is "down": every request is cut
    proxy.sever(); ...; proxy.restore()       # any protocol (e.g. Kafka): open connections cut, new ones refused

A dropped request closes the client's connection before anything reaches the service, the way
a crashed server or a broken network does. Bytes pass unchanged, so S3 SigV4 signatures hold.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable

REQUEST_LINE = re.compile(rb"(?:^|\r\n)([A-Z]+) (\S+) HTTP/1\.[01]\r\n")


class FaultyProxy:
    def __init__(self, host: str, port: int, drop: Callable[[str, str], bool] = lambda method, path: False):
        self.upstream, self.drop = (host, port), drop
        self.dropped: list[tuple[str, str]] = []
        self.forwarded: list[tuple[str, str]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        self._severed = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> FaultyProxy:
        threading.Thread(target=self._accept, name="faulty-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self._listener.close()

    def sever(self) -> None:
        """The service is unreachable: cut every open connection and close each new one at once, until restore()."""
        self._severed.set()
        with self._lock:
            for sock in self._open:
                _shut(sock)

    def restore(self) -> None:
        self._severed.clear()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by __exit__
                return
            if self._severed.is_set():
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.update((client, server))
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
        self._pump(client, server, True)

    def _pump(self, source: socket.socket, target: socket.socket, inspect: bool) -> None:
        """Copy bytes one way; on the request side, cut the connection at a request chosen to be dropped."""
        try:
            while chunk := source.recv(65536):
                for match in REQUEST_LINE.finditer(chunk) if inspect else ():
                    request = (match.group(1).decode(), match.group(2).decode("latin-1"))
                    if self.drop(*request):
                        self.dropped.append(request)
                        return
                    self.forwarded.append(request)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.difference_update((source, target))
            for sock in (source, target):
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
