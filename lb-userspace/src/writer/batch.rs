//! `BPF_MAP_LOOKUP_BATCH` on arrays. aya has no batch operations; reading
//! the 262,144 slots of the backend array one `BPF_MAP_LOOKUP_ELEM` at a
//! time takes 262,144 syscalls (about a quarter of a second) at every
//! start, where a batch read takes a handful.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` (linux/bpf.h, `enum bpf_cmd`; Linux ≥ 5.6).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Slots read per syscall.
const CHUNK: u32 = 16_384;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The `bpf(2)` batch command `cmd`; the kernel updates `attr.count`.
///
/// # Safety
/// `attr`'s pointers must be valid for the command.
unsafe fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: by the caller.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every slot of the array map `fd`, in index order, or `None` if the
/// kernel has no batch lookup for it (the caller reads slot by slot).
/// `V` must be the map's value type (same size).
pub fn read_array<V: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    len: u32,
) -> io::Result<Option<Vec<V>>> {
    let mut out: Vec<V> = Vec::with_capacity(len as usize);
    let mut keys = vec![0u32; CHUNK as usize];
    let mut values = vec![V::default(); CHUNK as usize];
    // The kernel's position between calls: for an array, the next index.
    let mut token: u32 = 0;
    let mut first = true;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values of the
        // map's types, and at two u32 batch tokens (an array's token is its
        // 4-byte key); all outlive the call.
        let err = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {}
            // 524: the kernel's ENOTSUPP, for map types without batch ops.
            Some(libc::EINVAL | libc::EOPNOTSUPP | 524) if first => return Ok(None),
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        }
        out.extend_from_slice(&values[..attr.count as usize]);
        // ENOENT: the last slot was read.
        if err.is_some() || out.len() >= len as usize {
            break;
        }
        token = next;
        first = false;
    }
    if out.len() != len as usize {
        return Err(io::Error::other(format!(
            "batch read returned {} of {len} slots",
            out.len()
        )));
    }
    Ok(Some(out))
}

/// `BPF_MAP_UPDATE_BATCH` (Linux ≥ 5.6).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `keys[i] → values[i]` for every `i` with `BPF_MAP_UPDATE_BATCH`
/// (each element as one `BPF_MAP_UPDATE_ELEM` would, in order). `Ok(false)`:
/// the kernel has no batch update for this map and nothing was written.
/// On an error, a prefix of the elements may have been written.
pub fn update<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<bool> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(CHUNK as usize);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at `n` keys and `n` values of the map's
        // types, which the kernel only reads.
        if let Err(e) = unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) } {
            let unsupported = matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
            );
            if done == 0 && attr.count == 0 && unsupported {
                return Ok(false);
            }
            return Err(e);
        }
        done += attr.count as usize;
    }
    Ok(true)
}
