;; spin (hostile): `run` loops forever. The host must stop it by fuel or by
;; its wall-clock deadline, discard the instance and keep serving.
(module
  (memory (export "memory") 1)
  ;; A fixed input buffer at 1024: the rest of the page holds any input these tests send.
  (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))

  (func (export "run") (param i32 i32) (result i64)
    (loop $forever (br $forever))
    (i64.const 0))
)
