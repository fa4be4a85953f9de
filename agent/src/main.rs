//! `flotilla-agent` binary.

fn main() {}
