//! The process's allocator: mimalloc, entered the way each request suits it.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Every mimalloc block is aligned to at least a word: its size classes are
/// whole words and its pages start aligned.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, with its plain entry points for requests no stricter than a word.
///
/// The `mimalloc` crate's allocator sends every request through the aligned
/// entry points. mimalloc 3 serves an aligned request outside its small-block
/// fast path (over 1 KiB, or when that size's free list needs refilling) by
/// over-allocating and adjusting, even for an alignment every block has anyway.
/// Under a connection per request that cost about 1 000 instructions per
/// request. Stricter alignments (tokio's cache-padded state) take the aligned
/// entry points.
pub struct Allocator;

// SAFETY: each method hands the request to mimalloc, through an entry point
// that honours the layout's alignment: the plain ones only when a word is
// enough, which every mimalloc block has, the aligned ones otherwise. A block
// is resized through the same kind of entry point that made it (the layout's
// alignment decides both), and every block is freed by `mi_free`.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

/// `mi_option_purge_delay` in mimalloc.h's option list (libmimalloc-sys names
/// only some of the options).
const MI_OPTION_PURGE_DELAY: mi::mi_option_t = 15;

/// mimalloc gives emptied pages back to the system after a delay, 1 s by
/// default. After a burst, pages freed by finished requests then stay resident
/// beside the connections that went idle. Measured with idle_memory.py at 8 000
/// connections: 3.5 to 3.8 KiB per idle connection by default, 2.7 to 2.9 at
/// 100 ms (2.5 to 2.7 at 0), for 0.7 `madvise` calls per 1 000 keep-alive
/// requests under load (0.2 by default, 29 at 0). `MIMALLOC_PURGE_DELAY` still
/// overrides it.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a documented option to a valid value; mimalloc reads it
        // at its next purge.
        unsafe { mi::mi_option_set(MI_OPTION_PURGE_DELAY, 100) };
    }
}

/// The assumptions the code above makes of mimalloc, pinned: a version that
/// broke them would fail here, not in production.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plain_block_is_at_least_word_aligned() {
        for size in (1..=4096).chain([8192, 65_536, 1 << 20, 8 << 20]) {
            // SAFETY: a plain allocation, checked and freed at once.
            let p = unsafe { mi::mi_malloc(size) };
            assert!(!p.is_null());
            assert_eq!(p as usize % WORD, 0, "a {size}-byte block at {p:?}");
            // SAFETY: `p` came from `mi_malloc` and is freed once.
            unsafe { mi::mi_free(p) };
        }
    }

    /// mimalloc reads `MIMALLOC_PURGE_DELAY` into the purge delay option at
    /// start: a child process started with it set shows which option that is.
    #[test]
    fn option_15_is_the_purge_delay() {
        if std::env::var_os("BASCULE_PURGE_DELAY_CHILD").is_some() {
            // SAFETY: reads an option by its index.
            assert_eq!(unsafe { mi::mi_option_get(MI_OPTION_PURGE_DELAY) }, 1234);
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["allocator::tests::option_15_is_the_purge_delay", "--exact"])
            .env("BASCULE_PURGE_DELAY_CHILD", "1")
            .env("MIMALLOC_PURGE_DELAY", "1234")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("1 passed"), "the child ran no test: {said}");
    }
}
