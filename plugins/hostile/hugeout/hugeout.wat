;; hugeout (hostile): outputs far larger than the manifest's max_output.
;;
;;   run    returns a real 4 MiB JSON string ("AAAA...") that fits its memory
;;   claim  returns a length of 100,000,000 bytes, far past the end of memory
;;
;; The host must check the length against max_output and against the memory
;; size before reading anything, and fail the call.
(module
  (memory (export "memory") 1)
  ;; A fixed input buffer at 1024: the rest of the page holds any input these tests send.
  (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))

  ;; The output fills pages 1..64, above the input buffer's page.
  (func (export "run") (param i32 i32) (result i64)
    (local $out i32)
    (local $len i32)
    (local.set $out (i32.const 65536))
    (local.set $len (i32.const 4194304))
    (if (i32.lt_u (memory.size) (i32.const 65))
      (then
        (if (i32.eq (memory.grow (i32.sub (i32.const 65) (memory.size))) (i32.const -1))
          (then (unreachable)))))
    (memory.fill (local.get $out) (i32.const 65) (local.get $len))  ;; 'A'
    (i32.store8 (local.get $out) (i32.const 34))                    ;; '"'
    (i32.store8 (i32.sub (i32.add (local.get $out) (local.get $len)) (i32.const 1))
                (i32.const 34))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))

  (func (export "claim") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 100000000)))
)
