;; membomb (hostile): `run` grows its memory one 64 KiB page at a time and
;; writes into each new page, forever; a refused grow does not stop it. The
;; host's memory cap must refuse the grows and fuel or the deadline must end
;; the call.
(module
  (memory (export "memory") 1)  ;; no maximum: only the host's limit applies
  ;; A fixed input buffer at 1024: the rest of the page holds any input these tests send.
  (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))

  (func (export "run") (param i32 i32) (result i64)
    (local $old i32)
    (loop $forever
      (local.set $old (memory.grow (i32.const 1)))
      (if (i32.ne (local.get $old) (i32.const -1))
        (then (i32.store8 (i32.shl (local.get $old) (i32.const 16)) (i32.const 1))))
      (br $forever))
    (i64.const 0))
)
