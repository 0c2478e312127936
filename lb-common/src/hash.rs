//! The flow hash that picks a Maglev slot, shared by the datapath and the
//! agent's reference model so both choose the same backend for a flow.
//!
//! It is MurmurHash3 (x86, 32-bit) over four 32-bit words: source address,
//! destination address, the two ports and the protocol, all taken in host
//! order so the result is the same on any architecture. It is not keyed:
//! every node computes the same hash for the same 5-tuple.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Seed of [`flow_hash_v4`]. Part of the datapath ABI: changing it moves flows.
pub const FLOW_HASH_SEED: u32 = 0x4c42_0001;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of an IPv4 5-tuple as it appears in the packet (addresses in wire
/// order, ports in network byte order).
#[inline(always)]
pub fn flow_hash_v4(src: [u8; 4], dst: [u8; 4], sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let ports = ((u16::from_be(sport_be) as u32) << 16) | u16::from_be(dport_be) as u32;
    let mut h = FLOW_HASH_SEED;
    h = mix(h, u32::from_be_bytes(src));
    h = mix(h, u32::from_be_bytes(dst));
    h = mix(h, ports);
    h = mix(h, proto as u32);
    fmix(h ^ 16)
}

/// The Maglev slot of `hash` in a table of `size` slots: `hash · size / 2³²`,
/// a multiply-shift rather than a modulo (no division in the datapath, and
/// the verifier sees a bounded index). Always `< size` for `size > 0`.
#[inline(always)]
pub fn maglev_slot(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
}

/// A second, independent hash of a flow from its first: least-connection's
/// second Maglev candidate for services with more than `LC_SCAN_MAX`
/// backends.
#[inline(always)]
pub fn rehash(hash: u32) -> u32 {
    fmix(hash ^ 0x9e37_79b9)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn deterministic_and_sensitive() {
        // Equal tuples hash equal; one changed port changes the hash.
        let a = flow_hash_v4(
            [198, 18, 0, 1],
            [198, 18, 0, 2],
            1234u16.to_be(),
            80u16.to_be(),
            6,
        );
        let b = flow_hash_v4(
            [198, 18, 0, 1],
            [198, 18, 0, 2],
            1234u16.to_be(),
            80u16.to_be(),
            6,
        );
        let c = flow_hash_v4(
            [198, 18, 0, 1],
            [198, 18, 0, 2],
            1235u16.to_be(),
            80u16.to_be(),
            6,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    proptest! {
        #[test]
        fn slot_is_in_range(hash in any::<u32>(), size in 1u32..=100_000) {
            prop_assert!(maglev_slot(hash, size) < size);
        }

        #[test]
        fn source_port_spreads_over_slots(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>()) {
            // 4,000 consecutive source ports over 8 buckets: each bucket gets
            // its 1/8 share within 25% (a poor hash clumps consecutive ports).
            let mut buckets = [0u32; 8];
            for port in 20_000u16..24_000 {
                let h = flow_hash_v4(src, dst, port.to_be(), 80u16.to_be(), 6);
                buckets[maglev_slot(h, 8) as usize] += 1;
            }
            for b in buckets {
                prop_assert!((375..=625).contains(&b), "{buckets:?}");
            }
        }
    }
}
