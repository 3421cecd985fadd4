//! Memory advice for large fresh buffers.
//!
//! Writing a large `vec![0; n]` for the first time faults once per 4 KiB page;
//! for quantize, dequantize and GGUF conversion those faults cost more than
//! the arithmetic. Transparent huge pages cut them 512-fold where the kernel
//! allows it (Linux, `madvise`); elsewhere this is a no-op.

/// Asks that `v`'s pages be transparent huge pages (Linux, large vectors).
///
/// For an output that is still untouched fresh memory from the kernel (a
/// large `vec![0; n]`), the first write then faults once per 2 MiB instead of
/// once per 4 KiB: the faults otherwise cost more than a dequantize itself.
pub(crate) fn advise_huge<T>(v: &[T]) {
    advise_range(v.as_ptr() as usize, std::mem::size_of_val(v));
}

/// A vector of `n` copies of `value` whose pages were advised huge before
/// the first write (any element type: the advice does not rely on the
/// allocator handing out untouched zero pages).
///
/// Long-lived weights read by streaming kernels want this too: a 4 KiB page
/// boundary stops the hardware prefetchers and costs a TLB miss, once per 64
/// cache lines.
pub(crate) fn huge_vec<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    advise_range(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v.resize(n, value);
    v
}

fn advise_range(start: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (a, b) = (
            (start + HUGE - 1) & !(HUGE - 1),
            (start + len) & !(HUGE - 1),
        );
        if len >= 4 * HUGE && b > a {
            // SAFETY: advice on whole pages inside one allocation (`start..start
            // + len` is a vector's buffer or capacity); it never
            // changes their contents, and a failure only leaves small pages.
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}
