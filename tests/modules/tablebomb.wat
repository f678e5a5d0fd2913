;; asks for a 100-million-entry table (800 MB of host memory) at instantiation
(module (table 100000000 funcref) (memory (export "memory") 1) (func (export "_start")))
