"""A TCP relay from this machine's loopback into a network namespace's loopback, on the same
port: `127.0.0.1:PORT` here reaches `127.0.0.1:PORT` inside the namespace. The test node's
control plane lives in a namespace of its own (its kubelet needs a non-loopback node address,
and its pods reach the apiserver there); this relay lets the tests, kubectl and helm on the host
use the same kubeconfig as the processes inside. Nothing leaves 127.0.0.0/8 on the host.

It binds its listening socket first, then enters the namespace (setns, through libc: Python 3.11
has no os.setns), so every connection it opens afterwards is made inside.

    python -m formation_vmm.devcluster.netns_relay NAMESPACE PORT
"""

import ctypes
import os
import selectors
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
CHUNK = 65536


def enter(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes, then close both."""
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, b)
    sel.register(b, selectors.EVENT_READ, a)
    try:
        while True:
            for key, _ in sel.select():
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                data = src.recv(CHUNK)
                if not data:
                    return
                key.data.sendall(data)
    except OSError:
        return
    finally:
        sel.close()
        a.close()
        b.close()


def serve(listener: socket.socket, port: int) -> None:
    while True:
        client, _ = listener.accept()
        try:
            inside = socket.create_connection(("127.0.0.1", port), timeout=10)
            inside.settimeout(None)
        except OSError:
            client.close()
            continue
        threading.Thread(target=pipe, args=(client, inside), daemon=True).start()


def main() -> None:
    namespace, port = sys.argv[1], int(sys.argv[2])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    enter(namespace)
    print(f"relay: 127.0.0.1:{port} -> {namespace} 127.0.0.1:{port}", flush=True)
    serve(listener, port)


if __name__ == "__main__":
    main()
