;; valid JSON, invalid contract: an actuation to a wildcard topic and a property of the wrong type
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "{\"actuations\":[{\"topic\":\"factory/#\",\"payload\":{\"fan\":\"on\"}}]}\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 61))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
