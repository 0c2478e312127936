//! The atomic operations the datapath needs, on raw pointers into map
//! values, as BPF atomic instructions.
//!
//! aya-build links for `--cpu generic`, for which LLVM refuses to use the
//! result of an atomic add (BPF ISA v1/v2 had none), and the BPF target
//! does not offer `AtomicU64::fetch_add`/`compare_exchange`. The kernel
//! (≥ 5.12) accepts `atomic_fetch_add` and `cmpxchg` whatever the
//! compiler's CPU setting, so they are written as inline assembly.

use core::arch::asm;

/// `*p += v`, returning the old value (`BPF_ATOMIC | BPF_ADD | BPF_FETCH`).
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: the caller passes a valid, aligned map-value pointer.
    unsafe {
        asm!(
            "{r} = atomic_fetch_add((u64 *)({p} + 0), {r})",
            p = in(reg) p,
            r = inout(reg) r,
            options(nostack),
        );
    }
    r
}

/// `*p += v` without the old value (`lock xadd`, any kernel).
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: as above.
    unsafe {
        asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) p,
            v = in(reg) v,
            options(nostack),
        );
    }
}

/// `*p`, read once: an aligned 8-byte load is never torn.
#[inline(always)]
pub unsafe fn load(p: *const u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(p) }
}

/// If `*p == old`, `*p = new`; returns the value `*p` had
/// (`BPF_ATOMIC | BPF_CMPXCHG`, which takes `old` in and returns in r0).
#[inline(always)]
pub unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    // SAFETY: as above.
    unsafe {
        asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") r0,
            options(nostack),
        );
    }
    r0
}
