//! The balancing policies' choice rules as pure functions: the reference the
//! datapath (`lb-ebpf/src/select.rs`) follows step for step and the agent's
//! model (`MemoryMaps`) uses, so host tests and golden packets hold both to
//! one definition.

use crate::consts::LC_SCAN_MAX;

/// Round-robin: the position in the service's backend list of turn `turn`
/// (the shared counter's value before this flow's increment) among `n > 0`
/// backends (0 for `n = 0`). Consecutive turns take the backends in list
/// order.
#[inline(always)]
pub fn rr_index(turn: u64, n: u32) -> u32 {
    // `checked_rem`: no division-by-zero panic path in the datapath.
    turn.checked_rem(n as u64).unwrap_or(0) as u32
}

/// Least-connection: the backend with the fewest open flows and that count.
///
/// `ids` are the service's usable backends in list order, `maglev` the
/// backend Maglev picks for the flow, `second` the backend of the flow's
/// re-hashed Maglev slot, `open(id)` a backend's open flows on this node.
///
/// * At most [`LC_SCAN_MAX`] backends: all are compared. Maglev's pick wins
///   ties; among other backends tied below it, the first in list order.
/// * More: only Maglev's pick and `second` are compared (two random
///   choices), Maglev's pick winning a tie.
pub fn least_conn(ids: &[u32], maglev: u32, second: u32, open: impl Fn(u32) -> u64) -> (u32, u64) {
    let mut best = (maglev, open(maglev));
    if ids.len() <= LC_SCAN_MAX as usize {
        for &id in ids {
            let n = open(id);
            if n < best.1 {
                best = (id, n);
            }
        }
    } else {
        let n = open(second);
        if n < best.1 {
            best = (second, n);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeMap, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn round_robin_takes_turns() {
        let picks: Vec<u32> = (0..7).map(|t| rr_index(t, 3)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(rr_index(u64::MAX, 1), 0);
    }

    #[test]
    fn fewest_flows_then_maglev_then_list_order() {
        let open = |c: &'static [(u32, u64)]| {
            move |id: u32| c.iter().find(|e| e.0 == id).map_or(0, |e| e.1)
        };
        // Strictly fewest wins.
        assert_eq!(
            least_conn(&[1, 2, 3], 2, 2, open(&[(1, 4), (2, 3), (3, 1)])),
            (3, 1)
        );
        // A tie with Maglev's pick: Maglev's pick.
        assert_eq!(
            least_conn(&[1, 2, 3], 3, 3, open(&[(1, 1), (2, 1), (3, 1)])),
            (3, 1)
        );
        // Tied below Maglev's pick: the first in list order.
        assert_eq!(
            least_conn(&[1, 2, 3], 3, 3, open(&[(1, 0), (2, 0), (3, 5)])),
            (1, 0)
        );
    }

    #[test]
    fn beyond_the_scan_limit_two_candidates() {
        let ids: Vec<u32> = (1..=LC_SCAN_MAX + 1).collect();
        // Backend 7 has the fewest, but only the candidates 10 and 20 count.
        let open = |id: u32| match id {
            7 => 0,
            10 => 5,
            20 => 3,
            _ => 9,
        };
        assert_eq!(least_conn(&ids, 10, 20, open), (20, 3));
        assert_eq!(least_conn(&ids, 20, 10, open), (20, 3));
        let flat = |_| 2;
        assert_eq!(
            least_conn(&ids, 10, 20, flat),
            (10, 2),
            "tie: Maglev's pick"
        );
    }

    proptest! {
        /// Against the definition: the minimum count; Maglev's pick if it
        /// has it, else the first in list order that has it.
        #[test]
        fn scan_matches_the_definition(
            counts in proptest::collection::vec(0u64..4, 1..(LC_SCAN_MAX as usize)),
            m in any::<prop::sample::Index>(),
        ) {
            let ids: Vec<u32> = (1..=counts.len() as u32).collect();
            let by_id: BTreeMap<u32, u64> = ids.iter().copied().zip(counts.iter().copied()).collect();
            let maglev = ids[m.index(ids.len())];
            let min = *counts.iter().min().unwrap();
            let want = if by_id[&maglev] == min {
                maglev
            } else {
                *ids.iter().find(|id| by_id[id] == min).unwrap()
            };
            prop_assert_eq!(least_conn(&ids, maglev, maglev, |id| by_id[&id]), (want, min));
        }

        /// n consecutive turns from any start visit every backend once.
        #[test]
        fn turns_are_a_permutation(start in any::<u64>(), n in 1u32..300) {
            let start = start / 2;
            let mut seen = std::vec![false; n as usize];
            for t in start..start + n as u64 {
                seen[rr_index(t, n) as usize] = true;
            }
            prop_assert!(seen.iter().all(|s| *s));
        }
    }
}
