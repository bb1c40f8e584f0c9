//! The `walsync` binary, built inside this package so that its tests can run it as a process:
//! the same entry point as `crates/walsync/src/main.rs`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    walsync::cli::main()
}
