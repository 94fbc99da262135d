;; sneaky (hostile): imports frys.kv_put although its manifest does not ask
;; for the "kv" capability. The host must refuse to link it, or fail the call
;; before anything reaches the key-value store.
(module
  (import "frys" "kv_put" (func $kv_put (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "secret")          ;; key, 6 bytes
  (data (i32.const 32) "\"stolen\"")      ;; value (JSON), 8 bytes
  ;; A fixed input buffer at 1024: the rest of the page holds any input these tests send.
  (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))

  (func (export "run") (param i32 i32) (result i64)
    (drop (call $kv_put (i32.const 16) (i32.const 6) (i32.const 32) (i32.const 8)))
    (i64.const 0))
)
