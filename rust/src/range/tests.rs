//! Exactness of every method at every level against the reference scan.

use super::kernel::score_reference;
use super::*;
use proptest::prelude::*;

fn gen(n: usize, d: usize, rank: usize, seed: u64) -> Vec<f32> {
    let mut rng = tree::SplitMix64(seed);
    let mut g = || (rng.next_f64() * 2.0 - 1.0) as f32;
    let basis: Vec<f32> = (0..rank * d).map(|_| g()).collect();
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let coef: Vec<f32> = (0..rank).map(|r| g() * 4.0 / (r + 1) as f32).collect();
        for j in 0..d {
            let mut x = 0.3 + 0.05 * g();
            for r in 0..rank {
                x += coef[r] * basis[r * d + j];
            }
            out.push(x);
        }
    }
    out
}

fn brute(keys: &[f32], d: usize, q: &[f32], t: f32) -> Vec<(i64, f32)> {
    keys.chunks_exact(d)
        .enumerate()
        .map(|(i, k)| (i as i64, score_reference(q, k)))
        .filter(|&(_, s)| s >= t)
        .collect()
}

fn check_all(keys: &[f32], d: usize, queries: &[f32], quantile: f64, method: Method, adds: &[f32]) {
    let split = keys.len() / d / 2 * d;
    let params = Params {
        rebuild_min: 16,
        rebuild_fraction: 0.3,
        ..Params::default()
    };
    let mut idx = RangeIndex::new(&keys[..split.max(d)], d, method, params).unwrap();
    let mut all: Vec<f32> = keys[..split.max(d)].to_vec();
    // Interleave adds: the rest of `keys` one by one, then `adds` in chunks.
    for k in keys[split.max(d)..].chunks_exact(d) {
        idx.add(k).unwrap();
        all.extend_from_slice(k);
    }
    for chunk in adds.chunks(5 * d) {
        idx.add(chunk).unwrap();
        all.extend_from_slice(chunk);
    }
    assert_eq!(idx.keys(), all);
    let nq = queries.len() / d;
    let mut th = Vec::new();
    for q in queries.chunks_exact(d) {
        let mut s: Vec<f32> = all.chunks_exact(d).map(|k| score_reference(q, k)).collect();
        s.sort_by(|a, b| b.total_cmp(a));
        th.push(s[((s.len() as f64 * quantile) as usize).min(s.len() - 1)]);
    }
    for level in Level::supported() {
        let r = idx.search_at(level, queries, &th).unwrap();
        assert_eq!(r.lims.len(), nq + 1);
        for (i, q) in queries.chunks_exact(d).enumerate() {
            let want = brute(&all, d, q, th[i]);
            let got: Vec<(i64, f32)> = (r.lims[i]..r.lims[i + 1])
                .map(|j| (r.ids[j], r.scores[j]))
                .collect();
            assert_eq!(got, want, "{method:?} {level} query {i}");
        }
        let k = 5.min(all.len() / d);
        let tk = idx.topk_at(level, queries, k).unwrap();
        for (i, q) in queries.chunks_exact(d).enumerate() {
            let mut s: Vec<(f32, i64)> = all
                .chunks_exact(d)
                .enumerate()
                .map(|(j, kk)| (score_reference(q, kk), j as i64))
                .collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<i64> = s[..k].iter().map(|x| x.1).collect();
            assert_eq!(
                &tk.ids[i * k..(i + 1) * k],
                want.as_slice(),
                "{method:?} {level} topk {i}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn every_method_matches_brute_force(
        n in 1usize..400, d in 1usize..40, rank in 1usize..6, seed in 0u64..10_000,
        quantile in 0.0f64..1.0, m in 0usize..4,
    ) {
        let keys = gen(n, d, rank, seed);
        let queries = gen(3, d, rank, seed + 1);
        let adds = gen(7, d, rank, seed + 2);
        let method = [Method::Pca, Method::Kmeans, Method::Auto, Method::Quant][m];
        check_all(&keys, d, &queries, quantile, method, &adds);
        check_all(&keys, d, &queries, quantile, Method::Flat, &[]);
    }
}

#[test]
fn low_rank_keys_are_pruned() {
    let d = 64;
    let keys = gen(8192, d, 4, 3);
    let idx = RangeIndex::new(&keys, d, Method::Pca, Params::default()).unwrap();
    let q = &keys[..d];
    let mut s: Vec<f32> = keys
        .chunks_exact(d)
        .map(|k| score_reference(q, k))
        .collect();
    s.sort_by(|a, b| b.total_cmp(a));
    let r = idx.search(q, &[s[81]]).unwrap();
    assert_eq!(r.ids.len(), 82);
    assert!(r.scanned[0] < 0.25, "scanned {}", r.scanned[0]);
    check_all(
        &keys[..2048 * d],
        d,
        &keys[d..4 * d],
        0.01,
        Method::Pca,
        &[],
    );
}

#[test]
fn bad_input_is_an_error() {
    let keys = gen(10, 4, 2, 1);
    assert!(RangeIndex::new(&[], 4, Method::Pca, Params::default()).is_err());
    let mut bad = keys.clone();
    bad[3] = f32::NAN;
    assert!(RangeIndex::new(&bad, 4, Method::Pca, Params::default()).is_err());
    let mut idx = RangeIndex::new(&keys, 4, Method::Auto, Params::default()).unwrap();
    assert!(idx.search(&[1.0; 3], &[0.0]).is_err());
    let e = idx.search(&[1.0; 8], &[0.0]).unwrap_err().to_string();
    assert!(e.contains("thresholds"), "{e}");
    assert!(idx.search(&[1.0; 4], &[f32::INFINITY]).is_err());
    assert!(idx.topk(&[1.0; 4], 11).is_err());
    assert!(idx.add(&[1.0; 5]).is_err());
    assert!(Method::parse("hnsw").is_err());
}

#[test]
fn clone_answers_as_the_original_and_is_independent() {
    let d = 16;
    let keys = gen(700, d, 3, 21);
    let q = gen(3, d, 3, 22);
    let params = Params {
        rebuild_min: 16,
        ..Params::default()
    };
    for method in Method::ALL {
        let mut idx = RangeIndex::new(&keys[..500 * d], d, method, params.clone()).unwrap();
        idx.add(&keys[500 * d..520 * d]).unwrap(); // pending, not in the tree
        let mut copy = idx.clone();
        let t = [0.5f32; 3];
        let (a, b) = (idx.search(&q, &t).unwrap(), copy.search(&q, &t).unwrap());
        assert_eq!((a.lims, a.ids, a.scores), (b.lims, b.ids, b.scores));
        assert_eq!(idx.stats().builds, copy.stats().builds);
        // Keys added to the copy stay out of the original, and the copy stays exact.
        copy.add(&keys[520 * d..]).unwrap();
        assert_eq!((idx.len(), copy.len()), (520, 700));
        let want: Vec<i64> = brute(&keys, d, &q[..d], t[0])
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        let got = copy.search(&q[..d], &t[..1]).unwrap();
        assert_eq!(got.ids, want, "{method:?}");
    }
}

#[test]
fn an_empty_batch_of_queries_gets_empty_answers() {
    let (n, d) = (300, 8);
    let keys = gen(n, d, 3, 5);
    for method in Method::ALL {
        let mut idx = RangeIndex::new(&keys, d, method, Params::default()).unwrap();
        for level in crate::simd::Level::supported() {
            let r = idx.search_at(level, &[], &[]).unwrap();
            assert_eq!(r.lims, vec![0], "{method:?}");
            assert!(r.ids.is_empty() && r.scores.is_empty() && r.scanned.is_empty());
            assert!(r.work.is_empty());
            let t = idx.topk_at(level, &[], 3).unwrap();
            assert!(t.ids.is_empty() && t.scores.is_empty() && t.scanned.is_empty());
            // k is still checked against the keys with no queries.
            assert!(idx.topk_at(level, &[], n + 1).is_err());
        }
        // An empty batch is no search to `auto`'s running measure.
        assert_eq!(idx.searches.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Thresholds must still match the (empty) batch.
        assert!(idx.search(&[], &[0.0]).is_err());
        // Adding no keys changes nothing (no rebuild either).
        let before = idx.stats();
        idx.add(&[]).unwrap();
        let after = idx.stats();
        assert_eq!((after.n, after.builds), (before.n, before.builds));
    }
}
