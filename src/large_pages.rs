//! The process's allocator: the system one, except that large blocks (activations, weights) are
//! mapped on 2 MiB boundaries and marked for transparent huge pages.
//!
//! glibc maps every block above its threshold (at most 32 MiB) afresh and unmaps it on free, so
//! every activation of a forward pass is faulted in again 4 KiB at a time; most Linux systems
//! give huge pages only to memory that asks for them (`transparent_hugepage=madvise`). With 2 MiB
//! pages the kernel faults 512× less often and the products' operands miss the TLB less: on the
//! 2-core CI machine SD 1.5's VAE decode went from 10.1–11.0 to 8.7–8.8 s (docs/performance.md).
//! The same as glibc's `glibc.malloc.hugetlb=1` tunable, which a program cannot set for itself.
//!
//! Freed large blocks are kept for later requests (see [`Kept`]), within the room the run has
//! already used, so that their pages skip the kernel's zeroing of fresh ones.

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

    /// A fresh mapping of `new` bytes on a huge-page boundary whose first `old` bytes are the
    /// pages of the mapping at `ptr` (moved, not copied), or null (`ptr` untouched). Unlike
    /// `mremap`'s own move, which puts the block wherever the kernel finds room (often off a
    /// 2 MiB boundary, splitting its huge pages), the grown block stays aligned.
    pub unsafe fn grow_aligned(ptr: *mut u8, old: usize, new: usize) -> *mut u8 {
        // SAFETY: `target` is a fresh mapping of at least `old` bytes; MREMAP_FIXED replaces its
        // first `old` bytes with `ptr`'s pages and unmaps `ptr`'s range.
        unsafe {
            let target = map(new);
            if target.is_null() {
                return target;
            }
            let old = rounded(old);
            let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            let moved = libc::mremap(ptr.cast(), old, old, flags, target.cast::<libc::c_void>());
            if moved == libc::MAP_FAILED {
                unmap(target, new);
                return std::ptr::null_mut();
            }
            advise(target, rounded(new));
            target
        }
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

/// Freed large blocks kept for later requests (see [`Kept::take`]). A forward pass allocates the
/// same shapes over and over, and a fresh mapping is zeroed by the kernel page by page where it
/// is first written: 14 % of the CPU time of T5's prompt encoding (`perf`, session 13). A request
/// never adds resident pages while kept ones are left (a grown block's growth unmaps at least as
/// much of the others), so the resident set never exceeds the most that was live at once (kept
/// blocks only fill room a run has already used, and the run's peak is unchanged);
/// [`release_cached`] gives them all back at the end of a run or load.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Kept {
    /// (address, mapped length) of each kept block, the first `count` slots.
    blocks: [(usize, usize); Kept::SLOTS],
    count: usize,
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl Kept {
    const SLOTS: usize = 64;

    const fn new() -> Self {
        Self {
            blocks: [(0, 0); Self::SLOTS],
            count: 0,
        }
    }

    /// A block of `len` bytes made of kept pages where there are any, with how many of its
    /// bytes were kept pages (resident already, contents left over) — the rest are fresh:
    ///
    /// * the smallest kept block of at least `len` bytes, its tail beyond `len` to `unmap`;
    /// * else the largest kept block, given to `grow` (its pages moved, not copied, into a
    ///   mapping of `len` bytes, or null on failure), with other kept blocks of at least the
    ///   growth in all to `unmap`, so that the resident set does not grow;
    /// * else (nothing kept) `None`: the caller maps a fresh block.
    ///
    /// A forward pass's sizes vary (every shape of every layer); exact-size reuse alone missed
    /// for ~60 % of SD 1.5's UNet bytes (session 14), each miss zeroed by the kernel again.
    fn take(
        &mut self,
        len: usize,
        mut unmap: impl FnMut(usize, usize),
        grow: impl FnOnce(usize, usize, usize) -> usize,
    ) -> Option<(usize, usize)> {
        let kept = &self.blocks[..self.count];
        let fitting = (0..self.count)
            .filter(|&i| kept[i].1 >= len)
            .min_by_key(|&i| kept[i].1);
        let largest = || (0..self.count).max_by_key(|&i| kept[i].1);
        let i = fitting.or_else(largest)?;
        let (address, n) = self.blocks[i];
        self.count -= 1;
        self.blocks[i] = self.blocks[self.count];
        if n >= len {
            if n > len {
                unmap(address + len, n - len);
            }
            return Some((address, len));
        }
        self.unmap_at_least(len - n, &mut unmap);
        match grow(address, n, len) {
            0 => {
                unmap(address, n);
                None
            }
            grown => Some((grown, n)),
        }
    }

    /// Keeps a freed block; false when every slot is taken (the caller unmaps it).
    fn keep(&mut self, address: usize, len: usize) -> bool {
        if self.count == Self::SLOTS {
            return false;
        }
        self.blocks[self.count] = (address, len);
        self.count += 1;
        true
    }

    fn drain(&mut self, mut unmap: impl FnMut(usize, usize)) {
        self.unmap_at_least(usize::MAX, &mut unmap);
    }

    /// Kept blocks, the last kept first, to `unmap` until `bytes` or all of them are gone.
    fn unmap_at_least(&mut self, bytes: usize, unmap: &mut impl FnMut(usize, usize)) {
        let mut freed = 0;
        while freed < bytes && self.count > 0 {
            self.count -= 1;
            let (address, n) = self.blocks[self.count];
            unmap(address, n);
            freed += n;
        }
    }
}

#[cfg(target_os = "linux")]
static KEPT: std::sync::Mutex<Kept> = std::sync::Mutex::new(Kept::new());

#[cfg(target_os = "linux")]
fn kept() -> std::sync::MutexGuard<'static, Kept> {
    // Nothing panics while holding it; a poisoned lock still holds a consistent list.
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(target_os = "linux")]
fn unmap_kept(address: usize, len: usize) {
    // SAFETY: a whole mapping (or a mapping's tail) of `len` bytes that was freed and that
    // nothing references.
    unsafe { map::unmap(address as *mut u8, len) };
}

#[cfg(target_os = "linux")]
fn grow_kept(address: usize, len: usize, new_len: usize) -> usize {
    // SAFETY: a whole mapping of `len` bytes that was freed and that nothing references.
    unsafe { map::grow_aligned(address as *mut u8, len, new_len) as usize }
}

/// Gives every kept block back to the system (at the end of a run or a load: an idle server holds
/// none).
pub fn release_cached() {
    #[cfg(target_os = "linux")]
    kept().drain(unmap_kept);
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
            let len = map::rounded(layout.size());
            if let Some((address, _)) = kept().take(len, unmap_kept, grow_kept) {
                return address as *mut u8;
            }
            // SAFETY: see the impl.
            return unsafe { map::map(layout.size()) };
        }
        // SAFETY: forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if mapped(&layout) {
            let len = map::rounded(layout.size());
            if let Some((address, reused)) = kept().take(len, unmap_kept, grow_kept) {
                let ptr = address as *mut u8;
                // The kept pages dropped (any grown part is fresh): they read as zeros again and
                // are zeroed where first touched, in parallel by the threads that fill them, as
                // a fresh mapping's (a memset here would zero them all on this thread).
                // SAFETY: a mapping of `len` ≥ `reused` bytes, ours alone.
                unsafe { libc::madvise(ptr.cast(), reused, libc::MADV_DONTNEED) };
                return ptr;
            }
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
            if kept().keep(ptr as usize, map::rounded(layout.size())) {
                return;
            }
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
            // SAFETY: made by `map` for `layout` (or grown from such a block, which may span two
            // kernel mappings that `mremap` cannot move as one: then a copy, as across the
            // threshold).
            (true, true) => unsafe {
                let moved = map::remap(ptr, layout.size(), new_size);
                if moved.is_null() {
                    self.copy_to_new(ptr, layout, new_layout)
                } else {
                    moved
                }
            },
            // Crossing the threshold: a new block, the contents copied, the old one freed.
            // SAFETY: forwarded.
            _ => unsafe { self.copy_to_new(ptr, layout, new_layout) },
        }
    }
}

impl LargePages {
    /// A new block for `new_layout` with the contents of `ptr`'s, which is freed; null (and
    /// `ptr` untouched) when no memory is left.
    ///
    /// SAFETY: `ptr` is a live block of this allocator for `layout`.
    unsafe fn copy_to_new(&self, ptr: *mut u8, layout: Layout, new_layout: Layout) -> *mut u8 {
        // SAFETY: both blocks are live and at least `min` bytes long.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                let min = layout.size().min(new_layout.size());
                std::ptr::copy_nonoverlapping(ptr, new, min);
                self.dealloc(ptr, layout);
            }
            new
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

    /// Kept pages are reused (whole blocks, prefixes of larger ones, smaller ones grown) and
    /// never make the process hold more than the most that was live at once: a long random run
    /// of allocations and frees, with the resident set modelled as live + kept bytes, every byte
    /// that leaves the kept list accounted for as reused or unmapped.
    #[test]
    fn kept_blocks_never_raise_the_resident_set_above_the_live_peak() {
        let mut kept = Kept::new();
        let (mut next_address, mut seed) = (1usize << 30, 12345u64);
        let mut random = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let kept_bytes = |kept: &Kept| kept.blocks[..kept.count].iter().map(|b| b.1).sum::<usize>();
        let mut live: Vec<(usize, usize)> = Vec::new();
        let (mut live_bytes, mut peak_live) = (0, 0);
        let (mut reused_bytes, mut requested_bytes, mut grown) = (0, 0, 0);
        for _ in 0..20_000 {
            if live.is_empty() || random(2) == 0 {
                let len = [1, 2, 3, 5, 8, 13][random(6) as usize] << 22;
                let before = kept_bytes(&kept);
                let mut unmapped = 0;
                let mut fresh = || {
                    next_address += 1 << 40;
                    next_address
                };
                let grow = |_, _, _| {
                    grown += 1;
                    fresh()
                };
                let address = match kept.take(len, |_, n| unmapped += n, grow) {
                    Some((address, reused)) => {
                        assert!(reused <= len);
                        assert_eq!(before - kept_bytes(&kept), reused + unmapped);
                        reused_bytes += reused;
                        address
                    }
                    None => {
                        assert_eq!(before - kept_bytes(&kept), unmapped);
                        next_address += 1 << 40;
                        next_address
                    }
                };
                requested_bytes += len;
                live_bytes += len;
                live.push((address, len));
            } else {
                let (address, len) = live.swap_remove(random(live.len() as u64) as usize);
                live_bytes -= len;
                kept.keep(address, len);
            }
            peak_live = peak_live.max(live_bytes);
            assert!(live_bytes + kept_bytes(&kept) <= peak_live);
        }
        // Most requested bytes come from kept pages once the run has reached its peak.
        assert!(
            reused_bytes * 10 > requested_bytes * 8,
            "{reused_bytes} of {requested_bytes} bytes reused"
        );
        assert!(grown > 100, "{grown} grown");
        let (mut returned, held) = (0, kept_bytes(&kept));
        kept.drain(|_, n| returned += n);
        assert_eq!((returned, kept.count), (held, 0));
    }

    /// The smallest kept block that fits goes to a request, its tail unmapped; without one the
    /// largest is grown, with others unmapped for the growth; and when every slot is taken the
    /// caller unmaps the freed block itself.
    #[test]
    fn kept_blocks_go_to_requests_they_fit() {
        let no_grow = |_, _, _| panic!("a fitting block is not grown");
        let mut kept = Kept::new();
        assert_eq!(
            kept.take(4 << 20, |_, _| panic!("nothing kept"), no_grow),
            None
        );
        assert!(kept.keep(0x1000_0000, 16 << 20));
        assert!(kept.keep(0x2000_0000, 8 << 20));
        assert!(kept.keep(0x3000_0000, 32 << 20));
        // Exactly 8 MiB: the 8 MiB block, nothing unmapped.
        let take = kept.take(
            8 << 20,
            |_, _| panic!("an exact fit unmaps nothing"),
            no_grow,
        );
        assert_eq!(take, Some((0x2000_0000, 8 << 20)));
        // 12 MiB: the 16 MiB block's first 12, its last 4 unmapped.
        let mut unmapped = Vec::new();
        let take = kept.take(12 << 20, |a, n| unmapped.push((a, n)), no_grow);
        assert_eq!(take, Some((0x1000_0000, 12 << 20)));
        assert_eq!(unmapped, vec![(0x1000_0000 + (12 << 20), 4 << 20)]);
        // 40 MiB with 32 + 4 + 4 kept: the 32 MiB block grown, 8 MiB of others unmapped.
        assert!(kept.keep(0x4000_0000, 4 << 20));
        assert!(kept.keep(0x5000_0000, 4 << 20));
        let mut unmapped = 0;
        let grow = |address, len, new_len| {
            assert_eq!((address, len, new_len), (0x3000_0000, 32 << 20, 40 << 20));
            0x6000_0000
        };
        let take = kept.take(40 << 20, |_, n| unmapped += n, grow);
        assert_eq!(
            (take, unmapped, kept.count),
            (Some((0x6000_0000, 32 << 20)), 8 << 20, 0)
        );
        // A failed growth unmaps the block too: the caller maps a fresh one.
        assert!(kept.keep(0x7000_0000, 4 << 20));
        let mut unmapped = 0;
        assert_eq!(kept.take(8 << 20, |_, n| unmapped += n, |_, _, _| 0), None);
        assert_eq!((unmapped, kept.count), (4 << 20, 0));
        for i in 0..Kept::SLOTS {
            assert!(kept.keep(0x4000_0000 + (i << 24), 4 << 20));
        }
        assert!(!kept.keep(0x9000_0000, 4 << 20));
    }

    /// A grown block starts on a huge-page boundary, holds the old pages' contents and zeros
    /// after them, and grows again through `realloc` (by `mremap` or, where the kernel keeps it
    /// as two mappings, by a copy) with its contents.
    #[cfg(target_os = "linux")]
    #[test]
    fn grown_blocks_stay_aligned_and_keep_their_pages() {
        let (old, new) = (LARGE + 5 * 4096 + 3, 5 * LARGE + 1);
        unsafe {
            let p = map::map(old);
            for i in 0..old {
                *p.add(i) = (i % 251) as u8;
            }
            let q = map::grow_aligned(p, old, new);
            assert!(!q.is_null());
            assert_eq!(q as usize % HUGE_PAGE, 0);
            let grown = std::slice::from_raw_parts(q, new);
            assert!(grown[..old]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8));
            assert!(grown[map::rounded(old)..].iter().all(|&b| b == 0));
            let layout = Layout::from_size_align(new, 64).unwrap();
            let r = LargePages.realloc(q, layout, 3 * new);
            assert!(!r.is_null());
            let again = std::slice::from_raw_parts(r, old);
            assert!(again.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            LargePages.dealloc(r, Layout::from_size_align(3 * new, 64).unwrap());
        }
    }

    /// A block freed dirty and handed out again as zeroed memory reads as zeros.
    #[test]
    fn reused_blocks_are_zeroed_when_asked() {
        let a = LargePages;
        let layout = Layout::from_size_align(LARGE + 77 * 4096 + 5, 64).unwrap();
        unsafe {
            let p = a.alloc(layout);
            std::ptr::write_bytes(p, 0xab, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert!(std::slice::from_raw_parts(q, layout.size())
                .iter()
                .all(|&b| b == 0));
            // Dirty again, then a larger zeroed request: the block grown (or a fresh one).
            std::ptr::write_bytes(q, 0xcd, layout.size());
            a.dealloc(q, layout);
            let larger = Layout::from_size_align(3 * LARGE + 5, 64).unwrap();
            let r = a.alloc_zeroed(larger);
            assert!(std::slice::from_raw_parts(r, larger.size())
                .iter()
                .all(|&b| b == 0));
            a.dealloc(r, larger);
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
