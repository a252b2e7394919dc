//! skiff: the command-line client of skiffd

fn main() {}
