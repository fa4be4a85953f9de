//! `flotilla` binary.

fn main() {}
