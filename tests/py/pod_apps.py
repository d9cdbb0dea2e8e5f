"""Unmodified apps for the pod and traffic tests, knowing nothing of the mesh.

  pod_apps.py grpc-server PORT        gRPC echo.v1.Echo/Say (raw bytes in, b"echo: " + bytes out)
                                      and echo.v1.Echo/Flaky ("KEY:N": UNAVAILABLE for the
                                      first N calls with KEY, then b"ok after N")
  pod_apps.py grpc-client ADDR N      N calls; prints one line per answer; exit 0 if all answered
  pod_apps.py grpc-probe ADDR AUTHORITY METHOD PAYLOAD [KEY=VALUE...]
                                      one call to echo.v1.Echo/METHOD with :authority AUTHORITY
                                      and the metadata given; prints "OK <answer>" or
                                      "<STATUS> <details>"
  pod_apps.py greeter PORT            TCP: greets first ("220 hello\n"), then echoes lines
  pod_apps.py greeter-client ADDR     reads the greeting before sending, then checks the echo

Uses python grpcio with generic handlers (no generated code).
"""
import socket
import sys
import time
from concurrent import futures


def grpc_server(port):
    import grpc

    def say(request, context):
        return b"echo: " + request

    calls = {}

    def flaky(request, context):
        key, n = request.decode().rsplit(":", 1)
        calls[key] = calls.get(key, 0) + 1
        if calls[key] <= int(n):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"flaky call {calls[key]} of {key}")
        return f"ok after {n}".encode()

    handler = grpc.method_handlers_generic_handler(
        "echo.v1.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


def grpc_client(addr, n):
    import grpc

    with grpc.insecure_channel(addr) as channel:
        say = channel.unary_unary("/echo.v1.Echo/Say")
        for i in range(n):
            answer = say(f"hello {i}".encode(), timeout=5)
            print(answer.decode(), flush=True)


def grpc_probe(addr, authority, method, payload, metadata):
    import grpc

    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(addr, options=options) as channel:
        call = channel.unary_unary(f"/echo.v1.Echo/{method}")
        try:
            answer = call(payload.encode(), timeout=10, metadata=metadata)
            print(f"OK {answer.decode()}", flush=True)
        except grpc.RpcError as e:
            print(f"{e.code().name} {e.details()}", flush=True)


def greeter(port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"220 hello\n")
            data = conn.recv(1024)
            if data:
                conn.sendall(data)


def greeter_client(addr):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(5)
        greeting = s.recv(1024)
        assert greeting == b"220 hello\n", greeting
        s.sendall(b"ping\n")
        echoed = s.recv(1024)
        assert echoed == b"ping\n", echoed
        print("greeted and echoed", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "grpc-server":
        grpc_server(int(sys.argv[2]))
    elif mode == "grpc-client":
        grpc_client(sys.argv[2], int(sys.argv[3]))
    elif mode == "grpc-probe":
        pairs = [kv.split("=", 1) for kv in sys.argv[6:]]
        grpc_probe(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], [tuple(p) for p in pairs])
    elif mode == "greeter":
        greeter(int(sys.argv[2]))
    elif mode == "greeter-client":
        greeter_client(sys.argv[2])
    else:
        sys.exit(f"unknown mode {mode}")
