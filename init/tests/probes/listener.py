# Accepts on every `port=tag` argument and answers each connection with one line: the tag and
# the connection's original destination (SO_ORIGINAL_DST, the local address when the connection
# was not redirected). Prints `ready` once listening. Used by the init and cni netns tests.
import selectors, socket, struct, sys
SO_ORIGINAL_DST = 80
def original_destination(conn):
    try:
        port, addr = struct.unpack("!2xH4s8x", conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
        return f"{socket.inet_ntoa(addr)}:{port}"
    except OSError:
        host, port = conn.getsockname()[:2]
        return f"{host}:{port}"
selector = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    port, tag = spec.split("=", 1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(64)
    selector.register(listener, selectors.EVENT_READ, tag)
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        conn, _ = key.fileobj.accept()
        with conn:
            conn.sendall(f"{key.data} {original_destination(conn)}\n".encode())
