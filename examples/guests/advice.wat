;; A reactor that uses samepage's guest API (`wit/dedup.wit`) through its core imports, as a
;; C guest built with `wit-bindgen c` calls them. Each export wraps one import and returns
;; what the import wrote at its return pointer, so that a host (or a test) can drive it:
;;
;;   fill(seed: i64, first: i32, pages: i32)   fills 4 KiB pages first..first+pages: word w of
;;                                             page p holds (p << 32 | w) ^ seed
;;   advise(offset, length, kind) -> (is_err, error)
;;   merge_now(offset, length) -> (is_err, pages_merged or error, zero_pages)
;;   stats() -> (pages_merged, zero_pages, profit_bytes)
;;   advise_ret(ret: i32)                      calls advise with return pointer `ret`, for
;;                                             the ABI's own checks
;;
;; Page 0 is the return area (never filled); the memory starts at 257 wasm pages (about
;; 16 MiB of 4 KiB pages from page 16 on) and may grow.
(module
  (import "samepage:dedup/advice@0.1.0" "advise"
    (func $advise (param i64 i64 i32 i32)))
  (import "samepage:dedup/advice@0.1.0" "merge-now"
    (func $merge_now (param i64 i64 i32)))
  (import "samepage:dedup/advice@0.1.0" "stats"
    (func $stats (param i32)))

  (memory (export "memory") 257)

  (global $RET i32 (i32.const 0))

  (func (export "fill") (param $seed i64) (param $first i32) (param $pages i32)
    (local $at i32) (local $end i32) (local $word i64) (local $page i64)
    (local.set $at (i32.mul (local.get $first) (i32.const 4096)))
    (local.set $end (i32.mul (i32.add (local.get $first) (local.get $pages)) (i32.const 4096)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $at) (local.get $end)))
        (local.set $page (i64.extend_i32_u (i32.shr_u (local.get $at) (i32.const 12))))
        (local.set $word (i64.extend_i32_u (i32.shr_u (i32.and (local.get $at) (i32.const 4095)) (i32.const 3))))
        (i64.store (local.get $at)
          (i64.xor
            (i64.or (i64.shl (local.get $page) (i64.const 32)) (local.get $word))
            (local.get $seed)))
        (local.set $at (i32.add (local.get $at) (i32.const 8)))
        (br $next))))

  (func (export "advise") (param $offset i64) (param $length i64) (param $kind i32)
    (result i32 i32)
    (call $advise (local.get $offset) (local.get $length) (local.get $kind) (global.get $RET))
    (i32.load8_u (global.get $RET))
    (i32.load8_u offset=1 (global.get $RET)))

  (func (export "advise_ret") (param $ret i32)
    (call $advise (i64.const 0) (i64.const 4096) (i32.const 0) (local.get $ret)))

  (func (export "merge_now") (param $offset i64) (param $length i64) (result i32 i64 i64)
    (call $merge_now (local.get $offset) (local.get $length) (global.get $RET))
    (i32.load8_u (global.get $RET))
    (if (result i64) (i32.load8_u (global.get $RET))
      (then (i64.load8_u offset=8 (global.get $RET)))
      (else (i64.load offset=8 (global.get $RET))))
    (i64.load offset=16 (global.get $RET)))

  (func (export "stats") (result i64 i64 i64)
    (call $stats (global.get $RET))
    (i64.load (global.get $RET))
    (i64.load offset=8 (global.get $RET))
    (i64.load offset=16 (global.get $RET)))

  (func (export "grow") (param $pages i32) (result i32)
    (memory.grow (local.get $pages))))
