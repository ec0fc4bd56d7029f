//! How a mesh process asks the kernel for memory.

/// Turns transparent huge pages off for this process (Linux; elsewhere
/// nothing to do), as Redis does by default (`disable-thp`).
///
/// With THP on (`always`, the default of many distributions and of this
/// project's test machines), the first touch of an empty 2 MiB-aligned
/// range maps a whole huge page and zeroes it. The allocator (mimalloc)
/// returns idle memory to the kernel and takes it back when load rises, so
/// under load the gate's threads spent whole stretches zeroing huge pages:
/// a profile of a paced gate benchmark caught 250 ms in which 70% of the
/// server's CPU was `clear_page_erms` under huge-page faults while no
/// decision completed, and the queue it left took seconds to drain
/// (BENCHMARKS.md, gate, session 20). With 4 KiB pages a fault zeroes
/// 4 KiB. The flag applies to the whole process, from now on.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(error = %e, "transparent huge pages left as the system has them");
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_afterwards() -> std::io::Result<()> {
        super::disable_transparent_huge_pages();
        assert!(rustix::thread::transparent_huge_pages_are_disabled()?);
        Ok(())
    }
}
