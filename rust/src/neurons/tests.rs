//! Tests of the neuron cache against brute-force models of each policy.

use super::*;
use proptest::prelude::*;

fn cfg(capacity: usize, policy: Policy) -> CacheConfig {
    CacheConfig {
        capacity,
        bytes_per_neuron: 10,
        policy,
        hysteresis: 0.0,
        reclassify_every: 0,
    }
}

fn freq() -> Policy {
    Policy::Frequency { decay: None }
}

#[test]
fn seed_behaviour_and_out_of_range_ids_raise() {
    let mut c = NeuronCache::new(100, cfg(5, freq())).unwrap();
    for _ in 0..1000 {
        c.record_indices(&[0, 1, 2, 3, 4]).unwrap();
    }
    c.record_indices(&[50]).unwrap();
    c.reclassify();
    assert_eq!(c.hot_neurons(), &[0, 1, 2, 3, 4]);
    assert_eq!(c.cold_neurons().len(), 95);
    assert!((c.activation_frequency(0).unwrap() - 1000.0 / 1001.0).abs() < 1e-12);
    let s = c.stats();
    assert_eq!(
        (s.num_hot, s.num_cold, s.total_activations, s.events),
        (5, 95, 1001, 5001)
    );
    let err = c.record_indices(&[3, 100]).unwrap_err().to_string();
    assert_eq!(err, "active index 100 is out of range for length 100");
    assert!(c.record_indices(&[-1]).is_err());
    assert_eq!(
        c.stats().total_activations,
        1001,
        "a failed call records nothing"
    );
    assert!(c.activation_frequency(100).is_err());
    c.clear();
    assert_eq!(c.stats().total_activations, 0);
    assert!(c.hot_neurons().is_empty());
}

#[test]
fn a_repeated_id_counts_once_as_in_a_mask() {
    // Counted per occurrence, [3, 1, 3] gave neuron 3 a frequency of 2.
    let (mut by_ids, mut by_mask) = (
        NeuronCache::new(8, cfg(2, freq())).unwrap(),
        NeuronCache::new(8, cfg(2, freq())).unwrap(),
    );
    by_ids.record_indices(&[3, 1, 3]).unwrap();
    by_mask.record_batch(&[0, 1, 0, 1, 0, 0, 0, 0], 1).unwrap();
    assert_eq!(by_ids.activation_frequency(3).unwrap(), 1.0);
    assert_eq!(by_ids.stats().events, 2);
    assert_eq!(by_ids.counts(), by_mask.counts());
}

#[test]
fn bad_config_is_rejected() {
    assert!(NeuronCache::new(10, cfg(11, freq())).is_err());
    assert!(NeuronCache::new(10, cfg(5, Policy::Frequency { decay: Some(1.5) })).is_err());
    assert!(NeuronCache::new(10, cfg(5, Policy::Window { k: 0 })).is_err());
    let mut c = cfg(5, freq());
    c.hysteresis = -1.0;
    assert!(NeuronCache::new(10, c).is_err());
}

#[test]
fn hits_and_bytes_are_counted_after_classification() {
    let mut c = NeuronCache::new(8, cfg(2, freq())).unwrap();
    c.record_indices(&[1, 2]).unwrap();
    c.record_indices(&[1, 2, 3]).unwrap();
    assert_eq!(c.stats().hits + c.stats().misses, 0);
    c.reclassify();
    assert_eq!(c.hot_neurons(), &[1, 2]);
    let mut mask = vec![0u8; 16];
    mask[1] = 1;
    mask[3] = 1;
    mask[8 + 2] = 1;
    c.record_batch(&mask, 2).unwrap();
    let s = c.stats();
    assert_eq!(
        (s.hits, s.misses, s.bytes_fetched, s.hot_bytes),
        (2, 1, 10, 20)
    );
    assert!((s.hit_rate - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn byte_figures_are_exact_past_u64() {
    // 2 hot neurons and 3 misses of 2^63 bytes each: products past u64::MAX,
    // reported exactly (they used to wrap to 0 and saturate at u64::MAX).
    let mut c = NeuronCache::new(
        8,
        CacheConfig {
            bytes_per_neuron: 1 << 63,
            ..cfg(2, freq())
        },
    )
    .unwrap();
    c.record_indices(&[1, 2]).unwrap();
    c.reclassify();
    c.record_indices(&[3, 4, 5]).unwrap();
    let s = c.stats();
    assert_eq!(s.hot_bytes, 2 * (1u128 << 63));
    assert_eq!(s.bytes_fetched, 3 * (1u128 << 63));
}

#[test]
fn window_policy_keeps_recent_neurons() {
    let mut c = NeuronCache::new(6, cfg(3, Policy::Window { k: 2 })).unwrap();
    for ids in [&[0i64, 1][..], &[2], &[3]] {
        c.record_indices(ids).unwrap();
    }
    c.reclassify();
    assert_eq!(c.hot_neurons(), &[2, 3]);
}

#[test]
fn decay_prefers_recent_activity() {
    let mut c = NeuronCache::new(4, cfg(1, Policy::Frequency { decay: Some(0.5) })).unwrap();
    for _ in 0..5 {
        c.record_indices(&[0]).unwrap();
    }
    for _ in 0..3 {
        c.record_indices(&[1]).unwrap();
    }
    c.reclassify();
    assert_eq!(c.hot_neurons(), &[1]);
    let mut plain = NeuronCache::new(4, cfg(1, freq())).unwrap();
    plain
        .record_batch(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0], 3)
        .unwrap();
    plain.reclassify();
    assert_eq!(plain.hot_neurons(), &[0]);
}

#[test]
fn hysteresis_keeps_incumbents_and_static_freezes() {
    let mut c = NeuronCache::new(
        3,
        CacheConfig {
            hysteresis: 0.5,
            ..cfg(1, freq())
        },
    )
    .unwrap();
    c.record_batch(&[1, 0, 0, 1, 0, 0], 2).unwrap();
    c.reclassify();
    assert_eq!(c.hot_neurons(), &[0]);
    c.record_batch(&[0, 1, 0, 0, 1, 0, 0, 1, 0], 3).unwrap(); // 2 vs 3: within the margin
    c.reclassify();
    assert_eq!(c.hot_neurons(), &[0]);
    c.record_batch(&[0, 1, 0], 1).unwrap(); // 2 vs 4: beyond it
    c.reclassify();
    assert_eq!(c.hot_neurons(), &[1]);

    let mut s = NeuronCache::new(3, cfg(1, Policy::Static)).unwrap();
    s.record_indices(&[2]).unwrap();
    s.reclassify();
    s.record_batch(&[1, 0, 0, 1, 0, 0], 2).unwrap();
    s.reclassify();
    assert_eq!(s.hot_neurons(), &[2]);
}

#[test]
fn auto_reclassify_splits_a_batch() {
    let mut c = NeuronCache::new(
        2,
        CacheConfig {
            reclassify_every: 1,
            ..cfg(1, Policy::Window { k: 1 })
        },
    )
    .unwrap();
    // Each token's neuron becomes hot after it, so the next token hits only on a repeat.
    c.record_batch(&[1, 0, 1, 0, 0, 1, 0, 1], 4).unwrap();
    let s = c.stats();
    assert_eq!((s.hits, s.misses), (2, 1));
}

#[test]
fn state_round_trips_and_bad_state_is_a_format_error() {
    let mut c = NeuronCache::new(5, cfg(2, Policy::Window { k: 3 })).unwrap();
    c.record_batch(&[1, 1, 0, 0, 1, 0, 1, 1, 0, 0], 2).unwrap();
    c.reclassify();
    let st = c.state();
    let d = NeuronCache::from_state(5, *c.config(), st.clone()).unwrap();
    assert_eq!(d.state(), st);
    let mut broken = st.clone();
    broken.hot = vec![7];
    assert!(matches!(
        NeuronCache::from_state(5, *c.config(), broken),
        Err(crate::Error::Format { .. })
    ));
    let mut broken = st.clone();
    broken.counts.pop();
    assert!(NeuronCache::from_state(5, *c.config(), broken).is_err());
    // hits + misses wrap to 0 in u64 (a tampered file), a count past u32.
    let mut broken = st.clone();
    (broken.counters[2], broken.counters[3]) = (1 << 63, 1 << 63);
    assert!(matches!(
        NeuronCache::from_state(5, *c.config(), broken),
        Err(crate::Error::Format { .. })
    ));
    let mut broken = st;
    broken.counters[0] = 1 << 40;
    broken.counts[0] = 1 << 33;
    assert!(NeuronCache::from_state(5, *c.config(), broken).is_err());
}

proptest! {
    #[test]
    fn batch_equals_row_by_row_and_hot_set_is_top_capacity(
        n in 1usize..300, rows in 1usize..6, cap_frac in 0.0f64..1.0, seed in any::<u64>(),
    ) {
        let mut s = seed | 1;
        let mut bit = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s % 3 == 0) as u8 };
        let mask: Vec<u8> = (0..n * rows).map(|_| bit()).collect();
        let cap = ((n as f64) * cap_frac) as usize;
        for policy in [freq(), Policy::Frequency { decay: Some(0.9) }, Policy::Window { k: 2 }] {
            let mut a = NeuronCache::new(n, cfg(cap, policy)).unwrap();
            let mut b = NeuronCache::new(n, cfg(cap, policy)).unwrap();
            a.record_batch(&mask, rows).unwrap();
            for r in 0..rows {
                let ids: Vec<i64> = (0..n).filter(|&j| mask[r * n + j] != 0).map(|j| j as i64).collect();
                b.record_indices(&ids).unwrap();
            }
            prop_assert_eq!(a.counts(), b.counts());
            a.reclassify();
            b.reclassify();
            prop_assert_eq!(a.hot_neurons(), b.hot_neurons());
            prop_assert!(a.hot_neurons().len() <= cap);
        }
        // Brute force for plain frequency: sort by (count desc, id asc), keep active ones.
        let mut c = NeuronCache::new(n, cfg(cap, freq())).unwrap();
        c.record_batch(&mask, rows).unwrap();
        c.reclassify();
        let mut order: Vec<usize> = (0..n).filter(|&j| c.counts()[j] > 0).collect();
        order.sort_by(|&x, &y| c.counts()[y].cmp(&c.counts()[x]).then(x.cmp(&y)));
        order.truncate(cap);
        order.sort();
        let want: Vec<u32> = order.iter().map(|&j| j as u32).collect();
        prop_assert_eq!(c.hot_neurons(), want.as_slice());
    }
}

#[test]
#[ignore = "timing probe: cargo test --release -- --ignored reclassify_timing --nocapture"]
fn reclassify_timing() {
    let n = 1 << 20;
    for policy in [
        freq(),
        Policy::Frequency { decay: Some(0.99) },
        Policy::Window { k: 16 },
    ] {
        let mut c = NeuronCache::new(
            n,
            CacheConfig {
                hysteresis: 0.1,
                ..cfg(n / 5, policy)
            },
        )
        .unwrap();
        let mut s = 7u64;
        let m: Vec<u8> = (0..64 * n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u8::from(s % 10 < 3)
            })
            .collect();
        let t = std::time::Instant::now();
        c.record_batch(&m, 64).unwrap();
        let rec = t.elapsed();
        c.reclassify();
        let mut keys = vec![0u32; n];
        c.keys_into(&mut keys);
        let t = std::time::Instant::now();
        c.keys_into(&mut keys);
        let tk = t.elapsed();
        let mut hist = Vec::new();
        super::select::top_cut(&keys, n / 5, &mut hist);
        let t = std::time::Instant::now();
        let cut = super::select::top_cut(&keys, n / 5, &mut hist);
        let tc = t.elapsed();
        let mut best = std::time::Duration::MAX;
        for _ in 0..10 {
            let t = std::time::Instant::now();
            c.reclassify();
            best = best.min(t.elapsed());
        }
        let mut bk = std::time::Duration::MAX;
        for _ in 0..10 {
            let t = std::time::Instant::now();
            c.keys_into(&mut keys);
            bk = bk.min(t.elapsed());
        }
        eprintln!("{policy:?}: record {rec:?}; keys {tk:?} (min {bk:?}) cut {tc:?} {cut:?}; reclassify min {best:?}");
    }
}
