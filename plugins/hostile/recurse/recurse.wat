;; recurse (hostile): `run` calls itself without end. The host's stack cap
;; (wasmtime max_wasm_stack) must turn it into a trap, not a crash.
(module
  (memory (export "memory") 1)
  ;; A fixed input buffer at 1024: the rest of the page holds any input these tests send.
  (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))

  (func $run (export "run") (param $ptr i32) (param $len i32) (result i64)
    ;; Not a tail call: the add after it keeps every frame alive.
    (i64.add
      (call $run (i32.add (local.get $ptr) (i32.const 1)) (local.get $len))
      (i64.const 1)))
)
