;; hits `unreachable` straight away
(module (memory (export "memory") 1) (func (export "_start") unreachable))
