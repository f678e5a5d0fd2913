;; tries to outlast its deadline inside a host call: poll_oneoff with a 30 s relative clock timeout
;; (epoch interruption cannot stop a guest that is blocked in the host, so the runtime must refuse it)
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; subscription at 0 (48 bytes): userdata u64, tag u8 = 0 (clock), clock id u32 @16 = 1 (monotonic),
    ;; timeout u64 @24 = 30 s, precision u64 @32, flags u16 @40 = 0 (relative)
    (i64.store (i32.const 0) (i64.const 7))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 30000000000))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    ;; events out at 256, nevents at 512
    (if (call $poll (i32.const 0) (i32.const 256) (i32.const 1) (i32.const 512))
      (then unreachable))))
