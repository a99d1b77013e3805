"""``txr local up``'s port check counts a port held only by TIME_WAIT sockets as free (the
servers bind it with SO_REUSEADDR too), and still counts a listening port as busy."""

from __future__ import annotations

import socket
from pathlib import Path

from infra.local import procs
from tests.fixtures import PORT_OFFSET

HOST = "127.0.0.1"
# Within the suite's own band (tests/fixtures: ports shift by TXR_TEST_PORT_OFFSET).
PORT_FIRST = 7980 + PORT_OFFSET
TIME_WAIT = "06"  # the state column of /proc/net/tcp


def _time_wait_ports() -> set[int]:
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == TIME_WAIT:
            ports.add(int(fields[1].split(":")[1], 16))
    return ports


def _leave_time_wait(port: int) -> None:
    """A connection on ``port`` whose server side closes first: that side sits in TIME_WAIT."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((HOST, port))
        server.listen(1)
        client = socket.create_connection((HOST, port))
        conn, _ = server.accept()
        conn.close()  # the active close: the server's end of the connection enters TIME_WAIT
        client.recv(1)  # the FIN reached the client
        client.close()


def _free_port() -> int:
    for port in range(PORT_FIRST, PORT_FIRST + 10):
        if procs.port_free(port) and port not in _time_wait_ports():
            return port
    raise RuntimeError("no free port for the test")


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    port = _free_port()
    _leave_time_wait(port)
    assert port in _time_wait_ports(), "the test must create a TIME_WAIT socket to mean anything"
    # A bind without SO_REUSEADDR (the old check) fails on exactly this port ...
    with socket.socket() as plain:
        try:
            plain.bind((HOST, port))
            plain_bind_ok = True
        except OSError:
            plain_bind_ok = False
    assert not plain_bind_ok
    # ... while the launcher's check calls it free, as the servers that bind it will.
    assert procs.port_free(port)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(1)
        assert not procs.port_free(port)
