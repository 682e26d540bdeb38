//! Giving memory back to the kernel once the control plane is idle after a
//! large change (`trellis_control::idle` says when and why).
//!
//! mimalloc returns freed pages lazily: it schedules them, and purges them
//! (`madvise`) at a later allocation or free once a delay has passed. In a
//! quiet control plane that later call is the next change's. A worker
//! thread of the runtime calls [`on_park`] each time it runs out of work;
//! when the actor has asked for a tidy-up since the thread last did one,
//! it collects its own heap and purges what every thread scheduled, while
//! nobody waits on it.

use std::cell::Cell;

thread_local! {
    /// The tidy-up generation this thread last acted on.
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// For `tokio::runtime::Builder::on_thread_park`: one atomic load, and a
/// collection when a tidy-up was asked for since this thread's last one.
pub fn on_park() {
    let want = trellis_control::idle::generation();
    if SEEN.with(|seen| seen.replace(want)) != want {
        release();
    }
}

/// Frees this thread's empty pages and purges every page mimalloc has
/// scheduled for purging, program-wide, at once instead of after its delay.
pub fn release() {
    // SAFETY: mi_collect takes no pointers and only touches mimalloc's own
    // state: this thread's heap, and the arenas under mimalloc's locks.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, in bytes.
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    #[allow(unsafe_code)]
    fn release_gives_freed_memory_back_at_once() {
        const BLOCK: usize = 4096;
        const BLOCKS: usize = 50_000; // 200 MB, in the small blocks a Config is made of
        const MB: u64 = 1 << 20;
        // mimalloc directly: this test binary's global allocator is the
        // system's.
        let before = rss();
        let blocks: Vec<*mut u8> = (0..BLOCKS)
            .map(|i| {
                // SAFETY: a fresh block of BLOCK bytes, written within bounds.
                unsafe {
                    let p = libmimalloc_sys::mi_malloc(BLOCK).cast::<u8>();
                    assert!(!p.is_null());
                    std::ptr::write_bytes(p, i as u8, BLOCK);
                    p
                }
            })
            .collect();
        for p in blocks {
            // SAFETY: each pointer came from mi_malloc above, freed once.
            unsafe { libmimalloc_sys::mi_free(p.cast()) };
        }
        let freed = rss();
        // mimalloc holds on to the freed pages until its purge delay passes
        // and something allocates or frees again.
        assert!(
            freed > before + 150 * MB,
            "freed blocks stay resident before a release: {} MB before, {} MB after the free",
            before / MB,
            freed / MB
        );
        release();
        let released = rss();
        assert!(
            released + 150 * MB < freed,
            "release returns them: {} MB after the free, {} MB after release",
            freed / MB,
            released / MB
        );
    }
}
