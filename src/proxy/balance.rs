//! Load balancers: which of a route's usable upstreams takes the next
//! request or connection.
//!
//! Owns the five policies of `registry::Balancer`. Does not know about
//! health, ejection or retries: the caller passes only the upstreams it may
//! use (passing, not ejected, not already tried for this request).
//!
//! - `round_robin`: in turn, from a counter per route.
//! - `least_connections`: fewest requests in flight; ties in turn.
//! - `random`: power of two choices: two at random, the one with fewer in
//!   flight.
//! - `weighted`: at random in proportion to each instance's `Weights`.
//! - `consistent_hash`: rendezvous hashing of the key (a header value, or
//!   the client IP for TCP) with each instance ID, so a key stays on its
//!   instance, and when instances come or go only the keys of those move.
//!   Without a key it falls back to round robin.
//!
//! Invariant: given a non-empty candidate list, `pick` returns an index into
//! it; given an empty one, `None`.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

use crate::registry::Balancer;

/// What a balancer needs to know about an upstream.
pub trait Candidate {
    /// Stable identity (the instance ID) for hashing.
    fn id(&self) -> &str;
    fn in_flight(&self) -> i64;
    fn weight(&self) -> u32;
}

/// Picks one of `cands`. `rr` is the route's turn counter.
pub fn pick<C: Candidate>(
    lb: Balancer,
    cands: &[C],
    key: Option<&[u8]>,
    rr: &AtomicUsize,
) -> Option<usize> {
    let n = cands.len();
    if n == 0 {
        return None;
    }
    if n == 1 {
        return Some(0);
    }
    let turn = || rr.fetch_add(1, Ordering::Relaxed) % n;
    Some(match lb {
        Balancer::RoundRobin => turn(),
        Balancer::LeastConnections => {
            let least = cands.iter().map(Candidate::in_flight).min().expect("n > 1");
            // Ties take turns among themselves, not from a rotating start
            // (which would favour the one after a busy instance).
            let tied: Vec<usize> = (0..n).filter(|&i| cands[i].in_flight() == least).collect();
            tied[rr.fetch_add(1, Ordering::Relaxed) % tied.len()]
        }
        Balancer::Random => {
            let mut rng = rand::thread_rng();
            let a = rng.gen_range(0..n);
            let b = (a + rng.gen_range(1..n)) % n;
            if cands[b].in_flight() < cands[a].in_flight() {
                b
            } else {
                a
            }
        }
        Balancer::Weighted => {
            let total: u64 = cands.iter().map(|c| u64::from(c.weight())).sum();
            if total == 0 {
                return Some(turn());
            }
            let mut r = rand::thread_rng().gen_range(0..total);
            let mut chosen = n - 1;
            for (i, c) in cands.iter().enumerate() {
                let w = u64::from(c.weight());
                if r < w {
                    chosen = i;
                    break;
                }
                r -= w;
            }
            chosen
        }
        Balancer::ConsistentHash => match key {
            Some(k) => (0..n)
                .max_by_key(|&i| (score(k, cands[i].id()), std::cmp::Reverse(i)))
                .expect("n > 1"),
            None => turn(),
        },
    })
}

/// Rendezvous score of `key` on instance `id`; the same on every node
/// running the same binary.
fn score(key: &[u8], id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct C(&'static str, i64, u32);

    impl Candidate for C {
        fn id(&self) -> &str {
            self.0
        }
        fn in_flight(&self) -> i64 {
            self.1
        }
        fn weight(&self) -> u32 {
            self.2
        }
    }

    fn three() -> Vec<C> {
        vec![C("a", 0, 1), C("b", 0, 1), C("c", 0, 1)]
    }

    #[test]
    fn empty_and_single() {
        let rr = AtomicUsize::new(0);
        assert_eq!(pick::<C>(Balancer::Random, &[], None, &rr), None);
        assert_eq!(pick(Balancer::Random, &[C("a", 9, 1)], None, &rr), Some(0));
    }

    #[test]
    fn round_robin_takes_turns() {
        let rr = AtomicUsize::new(0);
        let got: Vec<_> = (0..6)
            .map(|_| pick(Balancer::RoundRobin, &three(), None, &rr).expect("some"))
            .collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_connections_prefers_the_idle_one() {
        let rr = AtomicUsize::new(0);
        let c = vec![C("a", 5, 1), C("b", 0, 1), C("c", 3, 1)];
        for _ in 0..10 {
            assert_eq!(pick(Balancer::LeastConnections, &c, None, &rr), Some(1));
        }
        // Equally idle instances share evenly, whichever one is busy.
        let c = vec![C("a", 4, 1), C("b", 0, 1), C("c", 0, 1)];
        let mut hits = [0; 3];
        for _ in 0..30 {
            hits[pick(Balancer::LeastConnections, &c, None, &rr).expect("some")] += 1;
        }
        assert_eq!(hits, [0, 15, 15]);
    }

    #[test]
    fn two_choices_never_pick_the_busiest_of_three_twice_in_a_row_often() {
        let rr = AtomicUsize::new(0);
        let c = vec![C("a", 100, 1), C("b", 0, 1), C("c", 0, 1)];
        let busiest = (0..300)
            .filter(|_| pick(Balancer::Random, &c, None, &rr) == Some(0))
            .count();
        // The busiest only wins when both choices are it, which two distinct
        // choices never are.
        assert_eq!(busiest, 0);
    }

    #[test]
    fn weighted_follows_weights() {
        let rr = AtomicUsize::new(0);
        let c = vec![C("a", 0, 1), C("b", 0, 3), C("z", 0, 0)];
        let mut hits = [0u32; 3];
        for _ in 0..4000 {
            hits[pick(Balancer::Weighted, &c, None, &rr).expect("some")] += 1;
        }
        assert_eq!(hits[2], 0, "weight 0 takes nothing");
        let ratio = f64::from(hits[1]) / f64::from(hits[0]);
        assert!((2.4..3.8).contains(&ratio), "ratio {ratio} from {hits:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_the_removed_keys() {
        let rr = AtomicUsize::new(0);
        let all = three();
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let before: Vec<&str> = keys
            .iter()
            .map(|k| {
                let i = pick(Balancer::ConsistentHash, &all, Some(k.as_bytes()), &rr);
                all[i.expect("some")].0
            })
            .collect();
        // Sticky: asking again gives the same answer.
        for (k, b) in keys.iter().zip(&before) {
            let i = pick(Balancer::ConsistentHash, &all, Some(k.as_bytes()), &rr);
            assert_eq!(all[i.expect("some")].0, *b);
        }
        // Spread: every instance gets some keys.
        for id in ["a", "b", "c"] {
            assert!(before.iter().filter(|b| **b == id).count() > 30, "{id}");
        }
        // Dropping "b" moves only b's keys.
        let two = vec![C("a", 0, 1), C("c", 0, 1)];
        for (k, b) in keys.iter().zip(&before) {
            let i = pick(Balancer::ConsistentHash, &two, Some(k.as_bytes()), &rr);
            let now = two[i.expect("some")].0;
            if *b != "b" {
                assert_eq!(now, *b, "key {k} moved although its instance stayed");
            }
        }
    }
}
