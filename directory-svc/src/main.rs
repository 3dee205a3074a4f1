/// jemalloc: per-thread caches without glibc's arena locks (docs/decisions/jemalloc.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    platform::launch::main::<directory_svc::Application>()
}
