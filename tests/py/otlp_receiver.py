"""An OTLP/gRPC trace receiver that is not the mesh's: python grpcio serving
the TraceService from the opentelemetry-proto package's generated classes.

  otlp_receiver.py ADDR OUT      listen on ADDR (host:port, port 0 picks one);
                                 append each span to OUT as one JSON line;
                                 print "listening PORT" once ready
  otlp_receiver.py ADDR OUT --stall
                                 accept every export and never answer it
                                 (until the caller gives up), as a wedged
                                 collector does

Each line: trace_id, span_id, parent_span_id (hex, "" for none), name, kind
(SERVER/CLIENT/...), service (the resource's service.name), status_code,
attributes (string values).
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2


def value(v):
    kind = v.WhichOneof("value")
    return str(getattr(v, kind)) if kind else ""


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out, stall):
        self.out = out
        self.stall = stall
        self.lock = threading.Lock()

    def Export(self, request, context):
        if self.stall:
            with self.lock:
                with open(self.out + ".stalled", "a") as f:
                    f.write("export\n")
            while context.is_active():
                time.sleep(0.1)
            return trace_service_pb2.ExportTraceServiceResponse()
        lines = []
        for rs in request.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(),
                                "name": s.name,
                                "kind": trace_pb2.Span.SpanKind.Name(s.kind).removeprefix(
                                    "SPAN_KIND_"
                                ),
                                "service": resource.get("service.name", ""),
                                "status_code": s.status.code,
                                "attributes": {a.key: value(a.value) for a in s.attributes},
                            }
                        )
                    )
        with self.lock:
            with open(self.out, "a") as f:
                for line in lines:
                    f.write(line + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    addr, out = sys.argv[1], sys.argv[2]
    stall = sys.argv[3:] == ["--stall"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out, stall), server)
    port = server.add_insecure_port(addr)
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
