;; A WASI command that fills linear memory with pages that are the same in every instance and
;; all different within one: the ideal case for merging across instances, with nothing to
;; merge inside an instance.
;;
;; `_start` fills FILL_PAGES 4 KiB pages (from the environment, 4096 = 16 MiB by default)
;; starting at the second wasm page, growing memory as needed, then prints
;; "filled <N> pages". Word w (8 bytes) of filled page p holds (p << 32 | w) ^ SALT. With
;; FILL_UNIQUE_ODD=1, odd pages are also XORed with a random number drawn by each instance,
;; so that every other page is unique to its instance (the merge engine's worst case).
;; Numbers are read as decimal digits up to the first non-digit.
;;
;; The first wasm page is scratch space, never filled:
;;   0..64       the output line
;;   64..72      an iovec for fd_write
;;   72..80      environ_sizes_get's results, then fd_write's
;;   128..139    "FILL_PAGES="
;;   144..151    " pages\n"
;;   160..176    "FILL_UNIQUE_ODD="
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit"
    (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "random_get"
    (func $random_get (param i32 i32) (result i32)))

  (memory (export "memory") 1)

  (global $LINE i32 (i32.const 0))
  (global $IOVEC i32 (i32.const 64))
  (global $RESULTS i32 (i32.const 72))
  (global $PAGES_KEY i32 (i32.const 128))
  (global $PAGES_KEY_LEN i32 (i32.const 11))
  (global $UNIQUE_KEY i32 (i32.const 160))
  (global $UNIQUE_KEY_LEN i32 (i32.const 16))
  (global $SUFFIX i32 (i32.const 144))
  (global $SUFFIX_LEN i32 (i32.const 7))
  (global $FILL_BASE i32 (i32.const 65536))
  (global $DEFAULT_PAGES i32 (i32.const 4096))

  (data (i32.const 0) "filled ")
  (data (i32.const 128) "FILL_PAGES=")
  (data (i32.const 144) " pages\n")
  (data (i32.const 160) "FILL_UNIQUE_ODD=")

  ;; Grows linear memory until it holds at least $end bytes; traps when it cannot.
  (func $reserve (param $end i32)
    (local $missing i32)
    (local.set $missing
      (i32.sub
        (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16))
        (memory.size)))
    (if (i32.gt_s (local.get $missing) (i32.const 0))
      (then
        (if (i32.eq (memory.grow (local.get $missing)) (i32.const -1))
          (then unreachable)))))

  ;; The decimal number at $s, up to the first non-digit.
  (func $parse_decimal (param $s i32) (result i32)
    (local $n i32)
    (local $digit i32)
    (block $end
      (loop $next
        (local.set $digit (i32.sub (i32.load8_u (local.get $s)) (i32.const 48)))
        (br_if $end (i32.gt_u (local.get $digit) (i32.const 9)))
        (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10)) (local.get $digit)))
        (local.set $s (i32.add (local.get $s) (i32.const 1)))
        (br $next)))
    (local.get $n))

  ;; The number the environment gives for the $key_len-byte key at $key (which ends with
  ;; '='), else $default. The environment is read into the start of the fill area, which the
  ;; fill then overwrites (all of it unless the environment is larger than the fill).
  (func $env_number (param $key i32) (param $key_len i32) (param $default i32) (result i32)
    (local $count i32)
    (local $strings i32)
    (local $i i32)
    (local $s i32)
    (local $k i32)
    ;; A failed call leaves the counts zero: no environment.
    (drop (call $environ_sizes_get
      (global.get $RESULTS) (i32.add (global.get $RESULTS) (i32.const 4))))
    (local.set $count (i32.load (global.get $RESULTS)))
    (local.set $strings
      (i32.add (global.get $FILL_BASE) (i32.shl (local.get $count) (i32.const 2))))
    (call $reserve
      (i32.add (local.get $strings) (i32.load offset=4 (global.get $RESULTS))))
    (drop (call $environ_get (global.get $FILL_BASE) (local.get $strings)))
    (block $not_found
      (loop $variable
        (br_if $not_found (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $s
          (i32.load (i32.add (global.get $FILL_BASE) (i32.shl (local.get $i) (i32.const 2)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        ;; A shorter string differs from the key at its NUL at the latest.
        (local.set $k (i32.const 0))
        (block $mismatch
          (loop $byte
            (br_if $mismatch
              (i32.ne
                (i32.load8_u (i32.add (local.get $s) (local.get $k)))
                (i32.load8_u (i32.add (local.get $key) (local.get $k)))))
            (local.set $k (i32.add (local.get $k) (i32.const 1)))
            (br_if $byte (i32.lt_u (local.get $k) (local.get $key_len))))
          (return (call $parse_decimal (i32.add (local.get $s) (local.get $key_len)))))
        (br $variable)))
    (local.get $default))

  ;; Fills $pages pages from the fill base: word w of page p holds (p << 32 | w) ^ SALT, so
  ;; no two words of one instance are equal, and no page is all zeros. Odd pages are also
  ;; XORed with $odd_salt (zero: the same in every instance).
  (func $fill (param $pages i32) (param $odd_salt i64)
    (local $addr i32)
    (local $end i32)
    (local $p i64)
    (local $w i64)
    (local $salt i64)
    (local.set $addr (global.get $FILL_BASE))
    (local.set $end
      (i32.add (global.get $FILL_BASE) (i32.shl (local.get $pages) (i32.const 12))))
    (block $done
      (loop $page
        (br_if $done (i32.ge_u (local.get $addr) (local.get $end)))
        (local.set $w (i64.const 0))
        (local.set $salt
          (select (local.get $odd_salt) (i64.const 0)
            (i32.wrap_i64 (i64.and (local.get $p) (i64.const 1)))))
        (loop $word
          (i64.store (local.get $addr)
            (i64.xor
              (i64.or (i64.shl (local.get $p) (i64.const 32)) (local.get $w))
              (i64.xor (i64.const 0x5a17_c0de_5a17_c0de) (local.get $salt))))
          (local.set $addr (i32.add (local.get $addr) (i32.const 8)))
          (local.set $w (i64.add (local.get $w) (i64.const 1)))
          (br_if $word (i64.lt_u (local.get $w) (i64.const 512))))
        (local.set $p (i64.add (local.get $p) (i64.const 1)))
        (br $page))))

  ;; Writes $n in decimal at $at; returns the address after the last digit.
  (func $write_decimal (param $n i32) (param $at i32) (result i32)
    (local $end i32)
    (local $rest i32)
    (local $cursor i32)
    (local.set $end (i32.add (local.get $at) (i32.const 1)))
    (local.set $rest (i32.div_u (local.get $n) (i32.const 10)))
    (block $counted
      (loop $count
        (br_if $counted (i32.eqz (local.get $rest)))
        (local.set $end (i32.add (local.get $end) (i32.const 1)))
        (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
        (br $count)))
    (local.set $cursor (local.get $end))
    (loop $digit
      (local.set $cursor (i32.sub (local.get $cursor) (i32.const 1)))
      (i32.store8 (local.get $cursor)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (i32.gt_u (local.get $cursor) (local.get $at))))
    (local.get $end))

  (func (export "_start")
    (local $pages i32)
    (local $end i32)
    (local $odd_salt i64)
    (local.set $pages
      (call $env_number
        (global.get $PAGES_KEY) (global.get $PAGES_KEY_LEN) (global.get $DEFAULT_PAGES)))
    (if (call $env_number (global.get $UNIQUE_KEY) (global.get $UNIQUE_KEY_LEN) (i32.const 0))
      (then
        (if (call $random_get (global.get $RESULTS) (i32.const 8))
          (then (call $proc_exit (i32.const 1))))
        ;; A salt of zero would make the odd pages common after all.
        (local.set $odd_salt (i64.or (i64.load (global.get $RESULTS)) (i64.const 1)))))
    (call $reserve
      (i32.add (global.get $FILL_BASE) (i32.shl (local.get $pages) (i32.const 12))))
    (call $fill (local.get $pages) (local.get $odd_salt))
    ;; "filled " is already in place at the start of the line.
    (local.set $end
      (call $write_decimal (local.get $pages) (i32.add (global.get $LINE) (i32.const 7))))
    (memory.copy (local.get $end) (global.get $SUFFIX) (global.get $SUFFIX_LEN))
    (i32.store (global.get $IOVEC) (global.get $LINE))
    (i32.store offset=4 (global.get $IOVEC)
      (i32.sub (i32.add (local.get $end) (global.get $SUFFIX_LEN)) (global.get $LINE)))
    (if (call $fd_write (i32.const 1) (global.get $IOVEC) (i32.const 1) (global.get $RESULTS))
      (then (call $proc_exit (i32.const 1))))))
