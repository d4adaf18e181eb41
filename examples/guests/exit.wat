;; A WASI command that says where it is and exits with the status its first argument gives
;; (a decimal number; 0 without one): one line on stdout, one on stderr, then proc_exit. It
;; also exports `add`, for `samepage run --invoke add 2 3`.
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; Messages, and an iovec at 64.
  (data (i32.const 0) "to stdout\n")
  (data (i32.const 16) "to stderr\n")
  (func $say (param $fd i32) (param $at i32) (param $len i32)
    (i32.store (i32.const 64) (local.get $at))
    (i32.store (i32.const 68) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 64) (i32.const 1) (i32.const 72))))
  ;; The decimal number at $at, up to its NUL.
  (func $number (param $at i32) (result i32)
    (local $value i32) (local $digit i32)
    (block $end
      (loop $next
        (local.set $digit (i32.load8_u (local.get $at)))
        (br_if $end (i32.lt_u (local.get $digit) (i32.const 48)))
        (br_if $end (i32.gt_u (local.get $digit) (i32.const 57)))
        (local.set $value
          (i32.add (i32.mul (local.get $value) (i32.const 10))
                   (i32.sub (local.get $digit) (i32.const 48))))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $next)))
    (local.get $value))
  (func (export "_start")
    (local $status i32)
    (call $say (i32.const 1) (i32.const 0) (i32.const 10))
    (call $say (i32.const 2) (i32.const 16) (i32.const 10))
    ;; argc at 80, buffer size at 84; argv pointers from 1024, strings from 2048.
    (drop (call $args_sizes_get (i32.const 80) (i32.const 84)))
    (if (i32.ge_u (i32.load (i32.const 80)) (i32.const 2))
      (then
        (drop (call $args_get (i32.const 1024) (i32.const 2048)))
        (local.set $status (call $number (i32.load (i32.const 1028))))))
    (call $proc_exit (local.get $status)))
  (func (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1))))
