//! The `eventqueue` command. Every command lives in [`eventqueue::cli`]; this file only picks
//! the process's allocator.

use std::process::ExitCode;

/// The server's allocator. Request handlers allocate what the writer, acknowledger and
/// bulk-write threads free; with glibc's allocator those cross-thread frees contended on its
/// arena locks (a fifth of the HTTP workers' samples were in malloc/free). With mimalloc,
/// 8 HTTP clients × batches of 16 went from 135–169k to 164–200k events/s (compare harness,
/// alternating binaries, same minutes). Built without transparent huge pages (`no_thp`):
/// with them, 10k idle queues cost 30–48 MB of RSS instead of 13–19 MB (glibc: 9–11 MB). The
/// library leaves the choice to its users.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    eventqueue::cli::run()
}
