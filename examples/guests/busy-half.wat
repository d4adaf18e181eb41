;; A guest that runs for three seconds and writes half of its memory all along, while the
;; other half holds the same bytes in every instance: what running merges are for.
;;
;; - Bytes 0 .. 2 MiB ("shared half") are written once at the start with a pattern of their
;;   addresses, the same in every instance, then only read: one page of it every round, and
;;   all of it at the end.
;; - Bytes 2 MiB .. 4 MiB ("own half") are rewritten whole every round with words that
;;   depend on the round and on a seed from `random_get`, so they differ between instances
;;   and from round to round.
;; - At the end the guest checks both halves against what it wrote: it exits with 0 when every
;;   word is right, 2 when a shared page read in a round was wrong, 3 when the shared half
;;   was wrong at the end, and 4 when the own half was.
(module
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get"
    (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 65)

  (global $half i32 (i32.const 0x200000))
  (global $own_end i32 (i32.const 0x400000))
  ;; Scratch for the clock and the seed, past both halves.
  (global $scratch i32 (i32.const 0x400000))
  (global $run_nanos i64 (i64.const 3000000000))

  (func $now (result i64)
    (drop (call $clock_time_get (i32.const 1) (i64.const 1000) (global.get $scratch)))
    (i64.load (global.get $scratch)))

  (func $shared_word (param $addr i32) (result i32)
    (i32.or (i32.mul (local.get $addr) (i32.const 0x9E3779B1)) (i32.const 1)))

  (func $own_word (param $seed i32) (param $round i32) (param $addr i32) (result i32)
    (i32.xor
      (i32.mul (i32.add (local.get $addr) (local.get $round)) (i32.const 0x85EBCA6B))
      (local.get $seed)))

  (func $fill_shared
    (local $addr i32)
    (loop $words
      (i32.store (local.get $addr) (call $shared_word (local.get $addr)))
      (local.set $addr (i32.add (local.get $addr) (i32.const 4)))
      (br_if $words (i32.lt_u (local.get $addr) (global.get $half)))))

  ;; 1 when every word of [from, to) of the shared half is right.
  (func $shared_right (param $from i32) (param $to i32) (result i32)
    (local $addr i32)
    (local.set $addr (local.get $from))
    (loop $words
      (if (i32.ne (i32.load (local.get $addr)) (call $shared_word (local.get $addr)))
        (then (return (i32.const 0))))
      (local.set $addr (i32.add (local.get $addr) (i32.const 4)))
      (br_if $words (i32.lt_u (local.get $addr) (local.get $to))))
    (i32.const 1))

  (func $write_own (param $seed i32) (param $round i32)
    (local $addr i32)
    (local.set $addr (global.get $half))
    (loop $words
      (i32.store (local.get $addr)
        (call $own_word (local.get $seed) (local.get $round) (local.get $addr)))
      (local.set $addr (i32.add (local.get $addr) (i32.const 4)))
      (br_if $words (i32.lt_u (local.get $addr) (global.get $own_end)))))

  (func $own_right (param $seed i32) (param $round i32) (result i32)
    (local $addr i32)
    (local.set $addr (global.get $half))
    (loop $words
      (if (i32.ne (i32.load (local.get $addr))
                  (call $own_word (local.get $seed) (local.get $round) (local.get $addr)))
        (then (return (i32.const 0))))
      (local.set $addr (i32.add (local.get $addr) (i32.const 4)))
      (br_if $words (i32.lt_u (local.get $addr) (global.get $own_end))))
    (i32.const 1))

  (func (export "_start")
    (local $seed i32) (local $round i32) (local $end i64) (local $page i32)
    (drop (call $random_get (global.get $scratch) (i32.const 4)))
    (local.set $seed (i32.load (global.get $scratch)))
    (call $fill_shared)
    (local.set $end (i64.add (call $now) (global.get $run_nanos)))
    (loop $rounds
      (local.set $round (i32.add (local.get $round) (i32.const 1)))
      (call $write_own (local.get $seed) (local.get $round))
      (local.set $page
        (i32.and (i32.mul (local.get $round) (i32.const 4096)) (i32.const 0x1FF000)))
      (if (i32.eqz (call $shared_right
                     (local.get $page) (i32.add (local.get $page) (i32.const 4096))))
        (then (call $proc_exit (i32.const 2))))
      (br_if $rounds (i64.lt_u (call $now) (local.get $end))))
    (if (i32.eqz (call $shared_right (i32.const 0) (global.get $half)))
      (then (call $proc_exit (i32.const 3))))
    (if (i32.eqz (call $own_right (local.get $seed) (local.get $round)))
      (then (call $proc_exit (i32.const 4)))))
)
