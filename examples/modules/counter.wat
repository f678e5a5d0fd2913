;; counter — the smallest useful workload module, hand-written in WAT (no libc).
;;
;; Reads the whole input document from stdin, takes its saved state (a run counter: the input is
;; compact JSON whose last key is "state", so the number after the last ':' is the old count, or
;; null on the first run), and writes
;;   {"state":N,"events":[{"severity":"info","type":"tick","message":"run N read B input bytes"}]}
;; Built to examples/build/counter.wasm by scripts/build-examples.sh (WAT -> Wasm binary).
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $out (mut i32) (i32.const 64))
  (data (i32.const 1024) "{\"state\":")
  (data (i32.const 1040) ",\"events\":[{\"severity\":\"info\",\"type\":\"tick\",\"message\":\"run ")
  (data (i32.const 1120) " read ")
  (data (i32.const 1136) " input bytes\"}]}\0a")

  (func $emit (param $src i32) (param $len i32)
    (memory.copy (global.get $out) (local.get $src) (local.get $len))
    (global.set $out (i32.add (global.get $out) (local.get $len))))

  ;; decimal digits of $v, written backwards into 1200..1216 then emitted
  (func $emit_u32 (param $v i32)
    (local $p i32)
    (local.set $p (i32.const 1216))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $digit (local.get $v)))
    (call $emit (local.get $p) (i32.sub (i32.const 1216) (local.get $p))))

  (func (export "_start")
    (local $end i32) (local $p i32) (local $n i32) (local $count i32) (local $c i32)
    ;; read all of stdin to 65536.., growing memory a page at a time
    (local.set $end (i32.const 65536))
    (block $done
      (loop $read
        (if (i32.gt_u (i32.add (local.get $end) (i32.const 4096)) (i32.mul (memory.size) (i32.const 65536)))
          (then (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))))
        (i32.store (i32.const 0) (local.get $end))
        (i32.store (i32.const 4) (i32.const 4096))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $end (i32.add (local.get $end) (local.get $n)))
        (br $read)))
    ;; the last ':' of the document precedes the saved state
    (local.set $p (local.get $end))
    (block $found
      (loop $back
        (br_if $found (i32.le_u (local.get $p) (i32.const 65536)))
        (local.set $p (i32.sub (local.get $p) (i32.const 1)))
        (br_if $found (i32.eq (i32.load8_u (local.get $p)) (i32.const 58)))
        (br $back)))
    (block $stop
      (loop $dig
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br_if $stop (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $c (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
        (br_if $stop (i32.gt_u (local.get $c) (i32.const 9)))
        (local.set $count (i32.add (i32.mul (local.get $count) (i32.const 10)) (local.get $c)))
        (br $dig)))
    (local.set $count (i32.add (local.get $count) (i32.const 1)))
    (call $emit (i32.const 1024) (i32.const 9))
    (call $emit_u32 (local.get $count))
    (call $emit (i32.const 1040) (i32.const 59))
    (call $emit_u32 (local.get $count))
    (call $emit (i32.const 1120) (i32.const 6))
    (call $emit_u32 (i32.sub (local.get $end) (i32.const 65536)))
    (call $emit (i32.const 1136) (i32.const 17))
    ;; one fd_write of the whole output
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.sub (global.get $out) (i32.const 64)))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
