//! Incremental Internet checksum updates (RFC 1624, eqn. 3), used by the XDP
//! program to rewrite addresses and ports without summing the packet again.
//!
//! Values are in *memory order*: a 16-bit checksum field and the 16/32-bit
//! fields being replaced are loaded from the packet with native loads
//! (`from_ne_bytes`). One's-complement sums do not depend on byte order as
//! long as every word is loaded the same way, so no byte swapping is needed.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after one 16-bit word of the covered data changes from `old`
/// to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// New checksum after one 32-bit field (two words) changes from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let old = !old;
    !fold(!check as u32 + (old >> 16) + (old & 0xffff) + (new >> 16) + (new & 0xffff))
}

/// UDP variant: a zero checksum means "none" and stays zero; a computed zero
/// is sent as `0xffff` (RFC 768).
#[inline(always)]
pub fn udp_fixup(check: u16, updated: u16) -> u16 {
    if check == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

/// Adds two partial sums (each from [`sum`] or a 16-bit word).
#[inline(always)]
pub fn combine(a: u32, b: u32) -> u32 {
    fold(a + b) as u32
}

/// The checksum field value for data whose words sum to `sum`.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// The one's-complement sum of `data` (padded with a zero byte if odd), in
/// memory order, folded to 16 bits.
#[inline(always)]
pub fn sum(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_ne_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        s += u16::from_ne_bytes([*last, 0]) as u32;
    }
    fold(s) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    /// Writes a valid checksum at `at` and returns it (memory order).
    fn seal(data: &mut [u8], at: usize) -> u16 {
        data[at] = 0;
        data[at + 1] = 0;
        let c = !(sum(data) as u16);
        data[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        c
    }

    fn valid(data: &[u8]) -> bool {
        sum(data) == 0xffff
    }

    proptest! {
        #[test]
        fn replace4_matches_full_sum(mut data in proptest::collection::vec(any::<u8>(), 20..60),
                                     new in any::<[u8; 4]>(), at in 0usize..4) {
            // a 32-bit field at an even offset other than the checksum (bytes 10..12)
            let field = [0usize, 12, 16, 4][at];
            let check = seal(&mut data, 10);
            let old: [u8; 4] = data[field..field + 4].try_into().unwrap();
            data[field..field + 4].copy_from_slice(&new);
            let c = replace4(check, u32::from_ne_bytes(old), u32::from_ne_bytes(new));
            data[10..12].copy_from_slice(&c.to_ne_bytes());
            prop_assert!(valid(&data));
        }

        #[test]
        fn replace2_matches_full_sum(mut data in proptest::collection::vec(any::<u8>(), 8..40),
                                     new in any::<[u8; 2]>()) {
            let check = seal(&mut data, 6);
            let old = [data[2], data[3]];
            data[2..4].copy_from_slice(&new);
            let c = replace2(check, u16::from_ne_bytes(old), u16::from_ne_bytes(new));
            data[6..8].copy_from_slice(&c.to_ne_bytes());
            prop_assert!(valid(&data));
        }

        #[test]
        fn udp_zero_stays_zero(updated in any::<u16>()) {
            prop_assert_eq!(udp_fixup(0, updated), 0);
            prop_assert_ne!(udp_fixup(1, updated), 0);
        }
    }

    #[test]
    fn sum_of_known_ipv4_header() {
        // RFC 1071-style example: a real IPv4 header with a valid checksum.
        let hdr: Vec<u8> = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ]
        .to_vec();
        assert!(valid(&hdr));
    }
}
