# A small, deterministic CPython workload for samepage: it builds a heap of tens of MiB
# (dicts, lists, strings), round-trips it through json, scans it with a regex and sorts it.
# Run it as examples/real/python.wasm /in/python-heap.py with this folder preopened as /in.
import hashlib
import json
import re

records = [
    {"id": i, "name": "tenant-%05d" % i, "tags": ["a%d" % (i % 7), "b%d" % (i % 11)]}
    for i in range(40000)
]
text = json.dumps(records)
back = json.loads(text)
names = re.findall(r"tenant-\d+", text)
back.sort(key=lambda r: (r["tags"][1], -r["id"]))
digest = hashlib.sha256(text.encode()).hexdigest()
print(len(text), len(names), back[0]["id"], digest[:16])
