;; A WASI command that grows its linear memory to the whole 4 GiB a 32-bit memory can have
;; and writes one word into its last page: gigabytes of address space, one page of memory.
;; What the merge engine keeps for it should be what one page costs, not what 4 GiB would.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (if (i32.eq (memory.grow (i32.const 65535)) (i32.const -1))
      (then unreachable))
    (i32.store (i32.const 0xFFFFFFF0) (i32.const 42))))
