// A wasi:http handler in JavaScript, built into a component with componentize-js
// (StarlingMonkey, the runtime of jco and Fastly's JS SDK) by scripts/build-http-components.
//
// StarlingMonkey answers one request per instance: on an instance that has served one
// already, `respondWith` fails ("can't be called twice") or nothing is sent. A host must
// give every request an instance of its own, as `wasmtime serve` does.
//
// At start-up (in the snapshot componentize-js takes) it builds a table of 20,000 strings,
// what every instance holds the same way. Paths are told apart by their last segment, so
// that the function can be routed anywhere:
//
// - `/store?value=V` keeps V in a global and answers it (text);
// - `/read` answers what `/store` kept in this instance, empty when nothing (text);
// - anything else answers a line of JSON: the path, how many requests this instance has
//   served, the table's size and what is stored.

const TABLE = Array.from({ length: 20000 }, (_, n) => `entry-${n}-${(n * 2654435761) >>> 0}`);
let served = 0;
let stored = null;

function text(body) {
  return new Response(body, { headers: { 'content-type': 'text/plain' } });
}

function answer(request) {
  const url = new URL(request.url);
  const action = '/' + url.pathname.replace(/\/+$/, '').split('/').pop();
  if (action === '/store') {
    stored = url.searchParams.get('value') ?? '';
    return text(stored);
  }
  if (action === '/read') {
    return text(stored ?? '');
  }
  const body = JSON.stringify({
    path: url.pathname,
    served,
    entries: TABLE.length,
    stored,
  });
  return new Response(body + '\n', { headers: { 'content-type': 'application/json' } });
}

addEventListener('fetch', (event) => {
  served += 1;
  event.respondWith(answer(event.request));
});
