//! The allocator stages run on: size classes with free lists in front of
//! std's allocator.
//!
//! A stage allocates and frees a handful of small blocks per record (the
//! payload, key, topic, headers, serde's strings and maps), and in wasm the
//! general-purpose allocator std ships costs about as much per block as the
//! rest of a pass-through record's work. Here a small block is a pop from or
//! a push onto its class's list. Blocks above [`LARGEST`] bytes, and any
//! alignment above 16, go to std's allocator unchanged.
//!
//! Freed small blocks stay on their class's list for reuse rather than going
//! back to the general allocator: a stage's working set repeats from batch to
//! batch, and the host's memory cap still bounds the whole.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr;

/// Every block is aligned to this, so every class size is a multiple of it.
const ALIGN: usize = 16;
/// The largest block served from a class; larger ones go to the backing allocator.
pub const LARGEST: usize = 2048;
/// Blocks are carved from regions of this size taken from the backing allocator.
const REGION: usize = 64 * 1024;

/// Class sizes: steps of 16 up to 128, then four steps per power of two,
/// so no block wastes more than a fifth of itself.
const CLASSES: [usize; 24] = [
    16, 32, 48, 64, 80, 96, 112, 128, // steps of 16
    160, 192, 224, 256, // steps of 32
    320, 384, 448, 512, // 64
    640, 768, 896, 1024, // 128
    1280, 1536, 1792, 2048, // 256
];

/// The smallest class that holds `size` bytes; `size` is 1..=LARGEST.
fn class_of(size: usize) -> usize {
    if size <= 128 {
        return (size - 1) / 16;
    }
    let s = size - 1;
    let power = usize::BITS - 1 - s.leading_zeros(); // 7 for 129..=256
    let quarter = (s >> (power - 2)) & 3;
    8 + (power as usize - 7) * 4 + quarter
}

struct Lists {
    /// Head of each class's list of free blocks; a free block holds the next.
    free: [*mut u8; CLASSES.len()],
    /// The unused tail of the current region.
    bump: *mut u8,
    bump_end: *mut u8,
}

/// Size classes over `B`, the allocator that supplies regions and large blocks.
///
/// Not thread-safe: a stage instance runs on one thread, and the SDK installs
/// it only for wasm targets built without threads.
pub struct SizeClasses<B> {
    lists: UnsafeCell<Lists>,
    backing: B,
}

// SAFETY: installed only where there is one thread (see `lib.rs`); tests use
// an instance from a single thread.
unsafe impl<B: Sync> Sync for SizeClasses<B> {}

impl<B: GlobalAlloc> SizeClasses<B> {
    pub const fn new(backing: B) -> Self {
        SizeClasses {
            lists: UnsafeCell::new(Lists {
                free: [ptr::null_mut(); CLASSES.len()],
                bump: ptr::null_mut(),
                bump_end: ptr::null_mut(),
            }),
            backing,
        }
    }

    fn is_small(layout: Layout) -> bool {
        layout.size() <= LARGEST && layout.align() <= ALIGN
    }

    /// A new block of class `class`, carved from the current region or a new one.
    unsafe fn carve(&self, lists: &mut Lists, class: usize) -> *mut u8 {
        let size = CLASSES[class];
        if (lists.bump_end as usize) - (lists.bump as usize) < size {
            // SAFETY: REGION and ALIGN make a valid, non-zero layout.
            let region = unsafe {
                self.backing
                    .alloc(Layout::from_size_align_unchecked(REGION, ALIGN))
            };
            if region.is_null() {
                return region;
            }
            // The old region's tail (under one class size) is left unused.
            lists.bump = region;
            lists.bump_end = unsafe { region.add(REGION) };
        }
        let block = lists.bump;
        lists.bump = unsafe { block.add(size) };
        block
    }
}

unsafe impl<B: GlobalAlloc> GlobalAlloc for SizeClasses<B> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::is_small(layout) {
            return unsafe { self.backing.alloc(layout) };
        }
        // SAFETY: one thread, and no call below re-enters this allocator
        // while the borrow is live (the backing allocator is a different one).
        let lists = unsafe { &mut *self.lists.get() };
        let class = class_of(layout.size());
        let head = lists.free[class];
        if head.is_null() {
            return unsafe { self.carve(lists, class) };
        }
        // SAFETY: a free block's first word holds the next free block.
        lists.free[class] = unsafe { head.cast::<*mut u8>().read() };
        head
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if !Self::is_small(layout) {
            return unsafe { self.backing.dealloc(block, layout) };
        }
        let lists = unsafe { &mut *self.lists.get() };
        let class = class_of(layout.size());
        // SAFETY: the block is at least 16 bytes and 16-aligned, and is ours now.
        unsafe { block.cast::<*mut u8>().write(lists.free[class]) };
        lists.free[class] = block;
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` makes a valid layout at this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::is_small(layout), Self::is_small(new_layout)) {
            (false, false) => unsafe { self.backing.realloc(block, layout, new_size) },
            (true, true) if class_of(layout.size()) == class_of(new_size) => block,
            _ => {
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    #[test]
    fn every_size_gets_the_smallest_class_that_holds_it() {
        assert!(CLASSES.iter().all(|size| size % ALIGN == 0));
        for size in 1..=LARGEST {
            let class = class_of(size);
            assert!(
                CLASSES[class] >= size,
                "{size} in class of {}",
                CLASSES[class]
            );
            if class > 0 {
                assert!(CLASSES[class - 1] < size, "{size} fits a smaller class");
            }
        }
    }

    #[test]
    fn blocks_are_reused_and_never_overlap() {
        let heap = SizeClasses::new(System);
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        // Sizes across every class and the large path, with a fill byte each,
        // freed in an order unlike the one they were taken in.
        for round in 0..4u8 {
            for (i, size) in [1, 16, 17, 100, 129, 300, 2048, 2049, 70_000]
                .into_iter()
                .enumerate()
            {
                let layout = Layout::from_size_align(size, 8).expect("layout");
                let block = unsafe { heap.alloc(layout) };
                assert!(!block.is_null());
                assert_eq!(block as usize % 8, 0);
                let fill = round.wrapping_mul(16).wrapping_add(i as u8);
                unsafe { ptr::write_bytes(block, fill, size) };
                live.push((block, layout, fill));
            }
            for k in (0..live.len()).rev().step_by(2) {
                let (block, layout, fill) = live.swap_remove(k);
                let bytes = unsafe { std::slice::from_raw_parts(block, layout.size()) };
                assert!(bytes.iter().all(|b| *b == fill), "a block was overwritten");
                unsafe { heap.dealloc(block, layout) };
            }
        }
        for (block, layout, fill) in live {
            let bytes = unsafe { std::slice::from_raw_parts(block, layout.size()) };
            assert!(bytes.iter().all(|b| *b == fill), "a block was overwritten");
            unsafe { heap.dealloc(block, layout) };
        }
        // A freed block of a class is the next one handed out for it.
        let layout = Layout::from_size_align(40, 8).expect("layout");
        let first = unsafe { heap.alloc(layout) };
        unsafe { heap.dealloc(first, layout) };
        assert_eq!(unsafe { heap.alloc(layout) }, first);
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes_and_the_large_path() {
        let heap = SizeClasses::new(System);
        let mut layout = Layout::from_size_align(10, 1).expect("layout");
        let mut block = unsafe { heap.alloc(layout) };
        unsafe { ptr::copy_nonoverlapping(b"0123456789".as_ptr(), block, 10) };
        for new_size in [12, 200, 5000, 100_000, 3000, 64, 10] {
            block = unsafe { heap.realloc(block, layout, new_size) };
            assert!(!block.is_null());
            let bytes = unsafe { std::slice::from_raw_parts(block, 10) };
            assert_eq!(
                bytes, b"0123456789",
                "after growing or shrinking to {new_size}"
            );
            layout = Layout::from_size_align(new_size, 1).expect("layout");
        }
        unsafe { heap.dealloc(block, layout) };
    }

    #[test]
    fn high_alignment_goes_to_the_backing_allocator() {
        let heap = SizeClasses::new(System);
        let layout = Layout::from_size_align(64, 64).expect("layout");
        let block = unsafe { heap.alloc(layout) };
        assert_eq!(block as usize % 64, 0);
        unsafe { heap.dealloc(block, layout) };
    }
}
