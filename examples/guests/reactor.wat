;; A WASI reactor through which a host drives an instance's memory page by page: fill pages
;; with a pattern, write and read single bytes, zero pages, grow memory. Pages are 4 KiB OS
;; pages, numbered from the start of linear memory.
(module
  (memory (export "memory") 64 4096)

  ;; Nothing to set up; present because a reactor's host calls it once before anything else.
  (func (export "_initialize"))

  ;; Fills pages [$page_start, $page_start + $page_count): the 4-byte word at address a holds
  ;; (seed * 0x9E3779B1) ^ (a / 4). The same seed gives the same bytes at the same place in
  ;; every instance, and no two words of one fill are equal.
  (func (export "fill") (param $page_start i32) (param $page_count i32) (param $seed i32)
    (local $key i32)
    (local $addr i32)
    (local $end i32)
    (local.set $key (i32.mul (local.get $seed) (i32.const 0x9E3779B1)))
    (local.set $addr (i32.shl (local.get $page_start) (i32.const 12)))
    (local.set $end
      (i32.add (local.get $addr) (i32.shl (local.get $page_count) (i32.const 12))))
    (block $done
      (loop $word
        (br_if $done (i32.ge_u (local.get $addr) (local.get $end)))
        (i32.store (local.get $addr)
          (i32.xor (local.get $key) (i32.shr_u (local.get $addr) (i32.const 2))))
        (local.set $addr (i32.add (local.get $addr) (i32.const 4)))
        (br $word))))

  (func (export "write_byte") (param $addr i32) (param $value i32)
    (i32.store8 (local.get $addr) (local.get $value)))

  (func (export "read_byte") (param $addr i32) (result i32)
    (i32.load8_u (local.get $addr)))

  ;; Zeroes pages [$page_start, $page_start + $page_count).
  (func (export "zero") (param $page_start i32) (param $page_count i32)
    (memory.fill
      (i32.shl (local.get $page_start) (i32.const 12))
      (i32.const 0)
      (i32.shl (local.get $page_count) (i32.const 12))))

  ;; Grows memory by $wasm_pages 64 KiB pages; returns the old size in wasm pages, or -1.
  (func (export "grow") (param $wasm_pages i32) (result i32)
    (memory.grow (local.get $wasm_pages))))
