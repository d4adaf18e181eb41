"""A wasi:http handler, built into a component with componentize-py.

At start-up it builds a table of 20,000 SHA-256 digests: what every instance of a function
builds the same way, and what a warm instance keeps. Each request is answered with a line of
JSON saying how many requests this instance has served. Other paths exercise the host:

Paths are told apart by their last segment, so that the function can be routed anywhere:

- `/trap` raises, which traps the instance;
- `/spin` never returns (for request timeouts);
- `/sleep?ms=N` answers after N ms (for requests in flight);
- `/grow?mb=N` holds N MiB more for the instance's life (for memory limits and budgets);
- `/remember?value=V` keeps V in the instance, and every answer says it (for reuse);
- `/store?value=V` keeps V in the instance too and answers it as text, and `/read` answers
  what this instance keeps, empty when nothing (for isolation; as examples/http/app.js does);
- `/env?name=NAME` answers the environment variable NAME.
"""
import hashlib
import json
import os
import time
from urllib.parse import parse_qs, urlsplit

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
HELD = []
REMEMBERED = None


def answer(request: IncomingRequest) -> dict | str:
    global REMEMBERED
    url = urlsplit(request.path_with_query() or "/")
    query = {key: values[0] for key, values in parse_qs(url.query).items()}
    action = "/" + url.path.rstrip("/").rsplit("/", 1)[-1]
    if action == "/trap":
        raise RuntimeError("asked to trap")
    if action == "/spin":
        while True:
            pass
    if action == "/sleep":
        time.sleep(int(query.get("ms", "100")) / 1000)
    if action == "/grow":
        HELD.append(bytearray(int(query.get("mb", "1")) << 20))
    if action in ("/remember", "/store"):
        REMEMBERED = query.get("value")
    if action in ("/store", "/read"):
        return REMEMBERED or ""
    if action == "/env":
        return {"value": os.environ.get(query.get("name", ""))}
    return {
        "path": url.path,
        "served": SERVED,
        "entries": len(TABLE),
        "held_mb": sum(len(block) for block in HELD) >> 20,
        "remembered": REMEMBERED,
    }


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global SERVED
        SERVED += 1
        answered = answer(request)
        if isinstance(answered, str):
            body, kind = answered.encode(), b"text/plain"
        else:
            body, kind = json.dumps(answered).encode(), b"application/json"
        response = OutgoingResponse(Fields.from_list([("content-type", kind)]))
        out = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        stream = out.write()
        stream.blocking_write_and_flush(body)
        stream.__exit__(None, None, None)
        OutgoingBody.finish(out, None)
