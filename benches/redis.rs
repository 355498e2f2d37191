//! Redis store benches: written in the next commit.
fn main() {}
