# Connects to argv[1]:argv[2] (from source address argv[3], if given) and prints the listener's
# answer, or why there was none.
import socket, sys
try:
    source = (sys.argv[3], 0) if len(sys.argv) > 3 else None
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2, source_address=source) as conn:
        conn.settimeout(2)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = conn.recv(256)
            if not chunk:
                break
            answer += chunk
        print(answer.decode().strip() or "closed without answer")
except OSError as error:
    print(f"no connection: {error}")
