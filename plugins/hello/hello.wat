;; hello: the Frys Edge reactor ABI at its smallest (the ABI is in ../ABI.md).
;;
;;   echo   returns its input unchanged
;;   greet  ignores its input and returns {"hello":"world"}
;;
;; It asks for no capability, so it imports nothing from the host.
(module
  (memory (export "memory") 1)

  ;; The greeting, 17 bytes at address 16. The input buffer starts above it, at 1024.
  (data (i32.const 16) "{\"hello\":\"world\"}")

  ;; Returns the input buffer, 1024, after growing memory so that it holds $size
  ;; bytes; the host writes every input there. Traps when memory cannot grow,
  ;; which fails the call (returning 0 would not: 0 is a valid address).
  (func (export "input_buffer") (param $size i32) (result i32)
    (local $short i64)  ;; bytes missing: 1024 + size - memory size
    (local.set $short
      (i64.sub (i64.add (i64.const 1024) (i64.extend_i32_u (local.get $size)))
               (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16))))
    (if (i64.gt_s (local.get $short) (i64.const 0))
      (then
        (if (i32.eq (memory.grow (i32.wrap_i64
                      (i64.shr_u (i64.add (local.get $short) (i64.const 65535)) (i64.const 16))))
                    (i32.const -1))
          (then (unreachable)))))
    (i32.const 1024))

  ;; (ptr << 32) | len, the packed i64 every export returns.
  (func $pack (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len))))

  ;; The output only has to last until the host copies it, as the call returns:
  ;; the input buffer itself (echo) and static data (greet) both qualify.
  (func (export "echo") (param $in_ptr i32) (param $in_len i32) (result i64)
    (call $pack (local.get $in_ptr) (local.get $in_len)))

  (func (export "greet") (param $in_ptr i32) (param $in_len i32) (result i64)
    (call $pack (i32.const 16) (i32.const 17)))
)
