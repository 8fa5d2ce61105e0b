// A throwaway namespace with ovl's kernel programs loaded and one network's
// maps filled, and the frames to run through them with BPF_PROG_TEST_RUN.

//! Shared by the golden-packet tests (`tests/golden.rs`) and the
//! micro-benchmark (`xtask`'s `ovl-microbench`, which includes this module
//! by path); each uses part of it.

pub mod fixture;
pub mod frames;
