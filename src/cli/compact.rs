//! `eventqueue compact`: shrinks the database file of a data directory no server holds.

use std::path::PathBuf;

/// Flags of `eventqueue compact`.
#[derive(clap::Args, Debug)]
pub struct CompactArgs {
    /// Data directory to compact (stop the server first).
    #[arg(
        long,
        env = "EVENTQUEUE_DATA_DIR",
        value_name = "DIR",
        default_value = "./data"
    )]
    data_dir: PathBuf,
}

/// Runs the compaction and prints the sizes.
pub(super) fn compact(args: CompactArgs) -> Result<(), String> {
    match crate::compact_offline(&args.data_dir) {
        Ok(r) => {
            println!(
                "compacted {}: {:.1} MB → {:.1} MB",
                args.data_dir.display(),
                r.bytes_before as f64 / (1 << 20) as f64,
                r.bytes_after as f64 / (1 << 20) as f64
            );
            Ok(())
        }
        Err(e @ crate::Error::Locked { .. }) => Err(format!(
            "{e}. Offline compaction needs exclusive access: stop the server, then run it again."
        )),
        Err(e) => Err(format!("compaction failed: {e}")),
    }
}
