;; A WASI command that prints one line and exits 0: what `samepage run hello.wat` should do
;; as `wasmtime run` does, printing that line and nothing else.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "Hello, world!\n")
  (func (export "_start")
    ;; One iovec at 16: the 14 bytes at 0; bytes written go to 24.
    (i32.store (i32.const 16) (i32.const 0))
    (i32.store (i32.const 20) (i32.const 14))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
