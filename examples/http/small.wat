;; A small wasi:http/proxy handler, written as the core module of a component: it calls
;; wasi:http through the canonical ABI by hand, so it needs no toolchain and no language
;; runtime, and instantiates in well under a millisecond. `scripts/build-http-components`
;; makes a component of it with tools/componentize (world wasi:http/proxy@0.2.12, no
;; adapter: it imports nothing of WASI preview 1).
;;
;; It answers every request with one line, `small served=N path=PATH`, where N counts the
;; requests this instance has served (kept in linear memory, so that reuse is visible) and
;; PATH is the request's path and query. A path ending in /trap traps.
(module
  (import "wasi:http/types@0.2.12" "[method]incoming-request.path-with-query"
    (func $path_with_query (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]incoming-request"
    (func $drop_request (param i32)))
  (import "wasi:http/types@0.2.12" "[constructor]fields"
    (func $new_fields (result i32)))
  (import "wasi:http/types@0.2.12" "[constructor]outgoing-response"
    (func $new_response (param i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.body"
    (func $response_body (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]response-outparam.set"
    (func $set_response (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-body.write"
    (func $body_write (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]outgoing-body.finish"
    (func $body_finish (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-write-and-flush"
    (func $write_and_flush (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream"
    (func $drop_stream (param i32)))

  (memory (export "memory") 2)

  ;; Memory: 0..16 return area; 16 the served count; 64.. the response line; 4096.. the
  ;; bump heap of cabi_realloc, reset after each request.
  (global $heap (mut i32) (i32.const 4096))

  (data (i32.const 64) "small served=")

  (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32)
      (param $size i32) (result i32)
    (local $at i32)
    ;; Round up to the alignment, take $size bytes, grow the memory if they do not fit.
    (local.set $at
      (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get $align))))
    (global.set $heap (i32.add (local.get $at) (local.get $size)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow
                (i32.add (i32.shr_u (i32.sub (global.get $heap)
                                             (i32.mul (memory.size) (i32.const 65536)))
                                    (i32.const 16))
                         (i32.const 1)))
              (i32.const -1))
          (then unreachable))))
    (local.get $at))

  ;; Writes $n in decimal at $at; returns the address after it.
  (func $decimal (param $n i32) (param $at i32) (result i32)
    (local $end i32) (local $rest i32)
    ;; Count the digits to find the end, then write them from the last.
    (local.set $end (local.get $at))
    (local.set $rest (local.get $n))
    (loop $count
      (local.set $end (i32.add (local.get $end) (i32.const 1)))
      (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
      (br_if $count (local.get $rest)))
    (local.set $at (local.get $end))
    (loop $write
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $write (local.get $n)))
    (local.get $end))

  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $request i32) (param $out i32)
    (local $end i32) (local $path i32) (local $path_len i32)
    (local $response i32) (local $body i32) (local $stream i32)
    (global.set $heap (i32.const 4096))
    (i32.store (i32.const 16) (i32.add (i32.load (i32.const 16)) (i32.const 1)))

    ;; The line: "small served=N path=PATH\n".
    (local.set $end (call $decimal (i32.load (i32.const 16)) (i32.const 77)))
    (i64.store align=1 (local.get $end) (i64.const 0x3d68746170_20)) ;; " path=" (6 bytes)
    (local.set $end (i32.add (local.get $end) (i32.const 6)))
    (call $path_with_query (local.get $request) (i32.const 0))
    (if (i32.load8_u (i32.const 0))
      (then
        (local.set $path (i32.load (i32.const 4)))
        (local.set $path_len (i32.load (i32.const 8)))
        (memory.copy (local.get $end) (local.get $path) (local.get $path_len))
        (local.set $end (i32.add (local.get $end) (local.get $path_len)))))
    (i32.store8 (local.get $end) (i32.const 10))
    (local.set $end (i32.add (local.get $end) (i32.const 1)))
    (call $drop_request (local.get $request))

    ;; A path ending in "/trap" traps.
    (if (i32.ge_u (local.get $path_len) (i32.const 5))
      (then
        (if (i64.eq
              (i64.and
                (i64.load align=1
                  (i32.sub (i32.add (local.get $path) (local.get $path_len)) (i32.const 5)))
                (i64.const 0xffffffffff))
              (i64.const 0x706172742f)) ;; "/trap"
          (then unreachable))))

    (local.set $response (call $new_response (call $new_fields)))
    (call $response_body (local.get $response) (i32.const 0))
    (if (i32.load8_u (i32.const 0)) (then unreachable))
    (local.set $body (i32.load (i32.const 4)))
    (call $set_response (local.get $out) (i32.const 0) (local.get $response)
      (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (call $body_write (local.get $body) (i32.const 0))
    (if (i32.load8_u (i32.const 0)) (then unreachable))
    (local.set $stream (i32.load (i32.const 4)))
    (call $write_and_flush (local.get $stream) (i32.const 64)
      (i32.sub (local.get $end) (i32.const 64)) (i32.const 0))
    (if (i32.load8_u (i32.const 0)) (then unreachable))
    (call $drop_stream (local.get $stream))
    (call $body_finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 0))
    (if (i32.load8_u (i32.const 0)) (then unreachable)))
)
