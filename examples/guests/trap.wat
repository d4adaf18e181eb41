;; A WASI command whose `_start` writes a marker byte, then traps: the trap must end the run
;; but not the host, and leave the instance's memory readable (byte 0 holds 42).
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store8 (i32.const 0) (i32.const 42))
    unreachable))
