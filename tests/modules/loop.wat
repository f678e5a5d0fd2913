;; runaway: spins forever; the epoch deadline must stop it
(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))
