//! The `walsync` binary: the application is the `walsync` library; this is its entry point.

/// The replicator allocates per row (decoded values, JSON, keys); mimalloc measured faster than
/// glibc's allocator there, where malloc was the largest single item of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    walsync::cli::main()
}
