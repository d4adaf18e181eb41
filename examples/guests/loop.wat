;; A WASI command that never ends: what `-W timeout` and `-W fuel` are for.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever
      (br $forever))))
