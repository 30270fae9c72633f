//! The process's allocator: the system one, except that large blocks (activations, weights) are
//! mapped on 2 MiB boundaries and marked for transparent huge pages.
//!
//! glibc maps every block above its threshold (at most 32 MiB) afresh and unmaps it on free, so
//! every activation of a forward pass is faulted in again 4 KiB at a time; most Linux systems
//! give huge pages only to memory that asks for them (`transparent_hugepage=madvise`). With 2 MiB
//! pages the kernel faults 512× less often and the products' operands miss the TLB less: on the
//! 2-core CI machine SD 1.5's VAE decode went from 10.1–11.0 to 8.7–8.8 s (docs/performance.md).
//! The same as glibc's `glibc.malloc.hugetlb=1` tunable, which a program cannot set for itself.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks from this size up are mapped here; smaller ones are the system allocator's.
pub const LARGE: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

pub struct LargePages;

#[cfg(target_os = "linux")]
mod map {
    use super::HUGE_PAGE;

    /// Whole 4 KiB pages covering `size`: a block's last partial 2 MiB stays in small pages
    /// rather than rounding every block up to a huge page (+3 % of SD 1.5's weights).
    pub fn rounded(size: usize) -> usize {
        size.div_ceil(4096) * 4096
    }

    /// A fresh zeroed mapping of `rounded(size)` bytes starting on a huge-page boundary.
    pub unsafe fn map(size: usize) -> *mut u8 {
        let len = rounded(size);
        // SAFETY: an anonymous private mapping; its unused ends are unmapped below.
        unsafe {
            let raw = libc::mmap(
                std::ptr::null_mut(),
                len + HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if raw == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            let start = raw as usize;
            let aligned = start.next_multiple_of(HUGE_PAGE);
            let head = aligned - start;
            let tail = HUGE_PAGE - head;
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            advise(aligned as *mut u8, len);
            aligned as *mut u8
        }
    }

    /// Ask for huge pages (a hint: where THP is off the mapping keeps 4 KiB pages).
    pub unsafe fn advise(ptr: *mut u8, len: usize) {
        // SAFETY: `ptr..ptr + len` is one of our mappings.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    }

    pub unsafe fn unmap(ptr: *mut u8, size: usize) {
        // SAFETY: `ptr` came from `map(size)`.
        unsafe { libc::munmap(ptr.cast(), rounded(size)) };
    }

    /// The mapping grown or shrunk in place or moved by the kernel (no copy of the pages).
    pub unsafe fn remap(ptr: *mut u8, old: usize, new: usize) -> *mut u8 {
        let (old, new) = (rounded(old), rounded(new));
        if old == new {
            return ptr;
        }
        // SAFETY: `ptr` came from `map(old)`; the kernel keeps the contents.
        unsafe {
            let moved = libc::mremap(ptr.cast(), old, new, libc::MREMAP_MAYMOVE);
            if moved == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            advise(moved.cast(), new);
            moved.cast()
        }
    }
}

#[cfg(target_os = "linux")]
fn mapped(layout: &Layout) -> bool {
    // Mappings start on page boundaries wherever `mremap` moves them.
    layout.size() >= LARGE && layout.align() <= 4096
}

#[cfg(not(target_os = "linux"))]
fn mapped(_: &Layout) -> bool {
    false
}

// SAFETY: large blocks are whole mappings of at least their size, page-aligned (their alignment
// is at most a page), zero-filled by the kernel, and freed only by the path that made them (both sides
// decide by the same layout); everything else is the system allocator's.
unsafe impl GlobalAlloc for LargePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if mapped(&layout) {
            // SAFETY: see the impl.
            return unsafe { map::map(layout.size()) };
        }
        // SAFETY: forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if mapped(&layout) {
            // SAFETY: fresh anonymous mappings read as zeros (no memset on the calling thread;
            // the pages are zeroed where they are first touched, by the threads that fill them).
            return unsafe { map::map(layout.size()) };
        }
        // SAFETY: forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if mapped(&layout) {
            // SAFETY: made by `map` for this layout.
            return unsafe { map::unmap(ptr, layout.size()) };
        }
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's layout is valid and `new_size` fits its alignment (GlobalAlloc).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (mapped(&layout), mapped(&new_layout)) {
            // SAFETY: forwarded.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            #[cfg(target_os = "linux")]
            // SAFETY: made by `map` for `layout`.
            (true, true) => unsafe { map::remap(ptr, layout.size(), new_size) },
            // Crossing the threshold: a new block, the contents copied, the old one freed.
            _ => {
                // SAFETY: both blocks are live and at least `min` bytes long.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        let min = layout.size().min(new_size);
                        std::ptr::copy_nonoverlapping(ptr, new, min);
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large blocks: aligned, zeroed, writable to their last byte, kept through growth and
    /// shrinking across and above the threshold.
    #[test]
    fn large_blocks_are_aligned_zeroed_and_keep_their_contents() {
        let a = LargePages;
        let size = LARGE + 12_345;
        let layout = Layout::from_size_align(size, 64).unwrap();
        unsafe {
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            if cfg!(target_os = "linux") {
                assert_eq!(p as usize % HUGE_PAGE, 0);
            }
            let block = std::slice::from_raw_parts_mut(p, size);
            assert!(block.iter().all(|&b| b == 0));
            for (i, b) in block.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            // Grow far (the kernel may move it), shrink below the threshold, grow back.
            let p = a.realloc(p, layout, 3 * LARGE);
            let grown = std::slice::from_raw_parts_mut(p, 3 * LARGE);
            assert!(grown[..size]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8));
            grown[3 * LARGE - 1] = 7;
            let big = Layout::from_size_align(3 * LARGE, 64).unwrap();
            let p = a.realloc(p, big, 1000);
            let small = std::slice::from_raw_parts(p, 1000);
            assert!(small.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            let p = a.realloc(p, Layout::from_size_align(1000, 64).unwrap(), LARGE);
            let back = std::slice::from_raw_parts(p, 1000);
            assert!(back.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            a.dealloc(p, Layout::from_size_align(LARGE, 64).unwrap());
        }
    }

    /// The process runs on it: a large Vec is an ordinary Vec.
    #[test]
    fn large_vectors_work_through_the_global_allocator() {
        let mut v = vec![0f32; LARGE]; // 16 MiB
        assert!(v.iter().all(|&x| x == 0.0));
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        v.extend(std::iter::repeat_n(1.0, LARGE));
        assert_eq!(v[LARGE - 1], (LARGE - 1) as f32);
        assert_eq!(v[2 * LARGE - 1], 1.0);
    }
}
