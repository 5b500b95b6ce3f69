package boltstore

import "golang.org/x/sys/unix"

// mmapFlags makes the kernel read the whole file in, sequentially, when bbolt
// maps it. Start-up decodes every entry anyway, and bbolt advises the mapping
// MADV_RANDOM, so without this every page is a separate small read on first
// touch: ~350 ms instead of ~60 ms to load 100k entries from a cold cache
// (BenchmarkOpen100k/cold). POSIX_FADV_WILLNEED was tried and is no better:
// its readahead is asynchronous and the faults overtake it. The price is that
// a remap (the file outgrowing its mapping, at each doubling) also walks the
// whole file, which is cheap once it is cached; etcd makes the same choice.
const mmapFlags = unix.MAP_POPULATE
