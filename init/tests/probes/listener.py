# Accepts on every `port=tag` argument, on IPv4 and (where the kernel has it) IPv6, and answers
# each connection with one line: the tag and the connection's original destination
# (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, the local address when the connection was not
# redirected), IPv6 as [address]:port. Prints `ready` once listening. Used by the init and cni
# netns tests.
import selectors, socket, struct, sys
SO_ORIGINAL_DST = 80  # IP6T_SO_ORIGINAL_DST has the same number, at SOL_IPV6
def original_destination(conn):
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port, addr = struct.unpack("!2xH4x16s4x", raw)
            return f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:{port}"
        port, addr = struct.unpack("!2xH4s8x", conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
        return f"{socket.inet_ntoa(addr)}:{port}"
    except OSError:
        host, port = conn.getsockname()[:2]
        return f"[{host}]:{port}" if conn.family == socket.AF_INET6 else f"{host}:{port}"
def listen(family, address, port):
    listener = socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((address, port))
    listener.listen(64)
    return listener
selector = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    port, tag = spec.split("=", 1)
    selector.register(listen(socket.AF_INET, "0.0.0.0", int(port)), selectors.EVENT_READ, tag)
    if socket.has_ipv6:
        try:
            selector.register(listen(socket.AF_INET6, "::", int(port)), selectors.EVENT_READ, tag)
        except OSError:
            pass  # IPv6 disabled in this namespace: IPv4 only
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        conn, _ = key.fileobj.accept()
        with conn:
            conn.sendall(f"{key.data} {original_destination(conn)}\n".encode())
