"""A wasi:http handler, built into a component with componentize-py.

At start-up it builds a table of 20,000 SHA-256 digests: what every instance of a function
builds the same way, and what a warm instance keeps. Each request is answered with a line of
JSON saying how many requests this instance has served; `/trap` raises, which traps the
instance.
"""
import hashlib
import json

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

TABLE = {n: hashlib.sha256(str(n).encode()).hexdigest() for n in range(20000)}
SERVED = 0


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global SERVED
        SERVED += 1
        path = request.path_with_query() or "/"
        if path.startswith("/trap"):
            raise RuntimeError("asked to trap")
        body = json.dumps({"path": path, "served": SERVED, "entries": len(TABLE)}).encode()
        response = OutgoingResponse(Fields.from_list([("content-type", b"application/json")]))
        out = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        stream = out.write()
        stream.blocking_write_and_flush(body)
        stream.__exit__(None, None, None)
        OutgoingBody.finish(out, None)
