//! Data sharding: which part of a data set the task on node `rank` of `count` nodes works on.
//!
//! Every node computes its share on its own, from the same inputs (length, rank, node count and
//! options), so no coordination is needed: the shares of all ranks are disjoint and, unless
//! [`ShardOptions::drop_last`] is set, together cover every item exactly once. Shuffling uses a
//! fixed, platform-independent PRNG (splitmix64 driving a Fisher-Yates shuffle), so every node, on
//! every architecture and pointer width, computes the same permutation for the same seed.
//!
//! ```
//! use skyward_function::shard::{shard_with, ShardOptions};
//!
//! let data: Vec<u32> = (0..10).collect();
//! // Node 1 of 3, interleaved (the default): items 1, 4, 7.
//! assert_eq!(shard_with(&data, 1, 3, &ShardOptions::default()), vec![1, 4, 7]);
//! // Node 1 of 3, contiguous blocks of balanced size (4, 3, 3): items 4, 5, 6.
//! assert_eq!(shard_with(&data, 1, 3, &ShardOptions::contiguous()), vec![4, 5, 6]);
//! ```

/// How the (possibly shuffled) index list is split between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ShardMode {
    /// Interleaved: rank `r` of `n` gets positions `r`, `r + n`, `r + 2n`, ...
    #[default]
    Stride,
    /// One contiguous block per rank; blocks have balanced sizes: with `len = q * n + m`, the first
    /// `m` ranks get `q + 1` items and the others `q`.
    Contiguous,
}

/// Options of [`shard_indices`], [`shard_with`] and [`shard`].
///
/// The default is [`ShardMode::Stride`], no shuffle, no dropped tail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ShardOptions {
    /// How the index list is split between ranks.
    pub mode: ShardMode,
    /// When set, the index list `0..len` is permuted with this seed before it is split.
    pub shuffle_seed: Option<u64>,
    /// When set, every rank gets exactly `len / count` items (rounded down) and the remaining
    /// `len % count` items are left out, so that all ranks do the same amount of work.
    pub drop_last: bool,
}

impl ShardOptions {
    /// Interleaved sharding ([`ShardMode::Stride`]), no shuffle, no dropped tail: the default.
    pub fn stride() -> Self {
        Self::default()
    }

    /// Contiguous blocks of balanced size ([`ShardMode::Contiguous`]), no shuffle, no dropped tail.
    pub fn contiguous() -> Self {
        Self { mode: ShardMode::Contiguous, ..Self::default() }
    }

    /// Set the sharding mode.
    #[must_use]
    pub fn mode(mut self, mode: ShardMode) -> Self {
        self.mode = mode;
        self
    }

    /// Permute the items with `seed` before sharding; every node must use the same seed.
    #[must_use]
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.shuffle_seed = Some(seed);
        self
    }

    /// Give every rank exactly `len / count` items, leaving the tail out.
    #[must_use]
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }
}

/// Indices (into `0..len`) of the items that rank `rank` of `count` works on.
///
/// The result is in the order the rank should process them: ascending without shuffle, in
/// permuted order with [`ShardOptions::shuffle`].
///
/// `count == 0` or `rank >= count` (a rank that does not exist) yields an empty list: this function
/// never panics, so a task launched with odd instance information does nothing rather than crash.
pub fn shard_indices(len: usize, rank: u32, count: u32, opts: &ShardOptions) -> Vec<usize> {
    if count == 0 || rank >= count || len == 0 {
        return Vec::new();
    }
    // u32 always fits in usize on the platforms Rust supports for std (16-bit targets aside).
    let (rank, count) = (rank as usize, count as usize);
    let per_rank = len / count;
    let (start, end, step) = match (opts.mode, opts.drop_last) {
        (ShardMode::Stride, false) => (rank, len, count),
        // Positions rank, rank + count, ... below per_rank * count: exactly per_rank of them.
        (ShardMode::Stride, true) => (rank, per_rank * count, count),
        (ShardMode::Contiguous, false) => {
            let extra = len % count;
            let start = rank * per_rank + rank.min(extra);
            let size = per_rank + usize::from(rank < extra);
            (start, start + size, 1)
        }
        (ShardMode::Contiguous, true) => (rank * per_rank, (rank + 1) * per_rank, 1),
    };
    match opts.shuffle_seed {
        None => (start..end).step_by(step).collect(),
        Some(seed) => {
            let permutation = permutation(len, seed);
            (start..end).step_by(step).map(|i| permutation[i]).collect()
        }
    }
}

/// The permutation of `0..len` for `seed`: Fisher-Yates driven by splitmix64.
///
/// Identical on every platform: all arithmetic is done on `u64`, and bounded draws are unbiased
/// (multiply-shift with rejection), so the result does not depend on the pointer width.
fn permutation(len: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut items: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
    items
}

/// The splitmix64 generator (Steele, Lea and Flood, 2014): tiny, fast and fully specified.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform draw in `0..bound` (`bound > 0`), by Lemire's multiply-shift with rejection.
    fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(bound);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }
}

/// A data set that can be cut into shards by index.
///
/// Implemented for slices and vectors (cloning the chosen items) and for tuples of 2 to 4
/// references to shardable data, which are cut with the same indices so that corresponding items
/// stay aligned: `(&inputs[..], &labels)` yields `(Vec<Input>, Vec<Label>)` whose `i`-th elements
/// belong together, shuffled or not.
pub trait Shardable {
    /// What a shard is (for slices and vectors, a `Vec` of the chosen items).
    type Output;

    /// The items at `indices`, in that order. Indices at or past [`Self::shard_len`] are skipped.
    fn shard_by(&self, indices: &[usize]) -> Self::Output;

    /// Number of items. For tuples, the length of the shortest member: items past it in the longer
    /// members are never part of any shard.
    fn shard_len(&self) -> usize;
}

impl<T: Clone> Shardable for [T] {
    type Output = Vec<T>;

    fn shard_by(&self, indices: &[usize]) -> Vec<T> {
        indices.iter().filter_map(|&i| self.get(i).cloned()).collect()
    }

    fn shard_len(&self) -> usize {
        self.len()
    }
}

impl<T: Clone> Shardable for Vec<T> {
    type Output = Vec<T>;

    fn shard_by(&self, indices: &[usize]) -> Vec<T> {
        self.as_slice().shard_by(indices)
    }

    fn shard_len(&self) -> usize {
        self.len()
    }
}

macro_rules! shardable_tuple {
    ($($name:ident . $index:tt),+) => {
        impl<$($name: Shardable + ?Sized),+> Shardable for ($(&$name,)+) {
            type Output = ($($name::Output,)+);

            fn shard_by(&self, indices: &[usize]) -> Self::Output {
                // Indices must be valid for every member, or the members would fall out of step.
                let len = self.shard_len();
                if indices.iter().all(|&i| i < len) {
                    ($(self.$index.shard_by(indices),)+)
                } else {
                    let valid: Vec<usize> = indices.iter().copied().filter(|&i| i < len).collect();
                    ($(self.$index.shard_by(&valid),)+)
                }
            }

            fn shard_len(&self) -> usize {
                let mut len = usize::MAX;
                $(len = len.min(self.$index.shard_len());)+
                len
            }
        }
    };
}

shardable_tuple!(A.0, B.1);
shardable_tuple!(A.0, B.1, C.2);
shardable_tuple!(A.0, B.1, C.2, D.3);

/// The share of `data` of rank `rank` of `count`: `data.shard_by(&shard_indices(..))`.
///
/// Like [`shard_indices`], an impossible `rank`/`count` yields an empty shard rather than a panic.
pub fn shard_with<S: Shardable + ?Sized>(data: &S, rank: u32, count: u32, opts: &ShardOptions) -> S::Output {
    data.shard_by(&shard_indices(data.shard_len(), rank, count, opts))
}

/// The share of `data` of the node this task runs on, with default options (interleaved, no
/// shuffle, no dropped tail).
///
/// Rank and node count come from [`crate::context::instance_info`]. Use [`shard_with`] for other
/// options: `shard_with(&data, info.rank, info.node_count, &ShardOptions::contiguous().shuffle(7))`.
pub fn shard<S: Shardable + ?Sized>(data: &S) -> S::Output {
    let info = crate::context::instance_info();
    shard_with(data, info.rank, info.node_count, &ShardOptions::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_options() -> Vec<ShardOptions> {
        let mut options = Vec::new();
        for mode in [ShardMode::Stride, ShardMode::Contiguous] {
            for seed in [None, Some(0), Some(42)] {
                for drop_last in [false, true] {
                    options.push(ShardOptions { mode, shuffle_seed: seed, drop_last });
                }
            }
        }
        options
    }

    #[test]
    fn union_of_shards_covers_every_item_once() {
        for opts in all_options().into_iter().filter(|o| !o.drop_last) {
            for len in (0..40).chain([97, 100, 1000]) {
                for count in 1..=12u32 {
                    let mut seen = vec![0u32; len];
                    let mut sizes = Vec::new();
                    for rank in 0..count {
                        let shard = shard_indices(len, rank, count, &opts);
                        sizes.push(shard.len());
                        for i in shard {
                            seen[i] += 1;
                        }
                    }
                    assert!(seen.iter().all(|&n| n == 1), "len {len} count {count} {opts:?}: {seen:?}");
                    // Balanced: sizes differ by at most one, larger shards first.
                    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                    assert!(max - min <= 1, "len {len} count {count} {opts:?}: {sizes:?}");
                    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
                }
            }
        }
    }

    #[test]
    fn drop_last_gives_equal_disjoint_shards() {
        for opts in all_options().into_iter().filter(|o| o.drop_last) {
            for len in (0..40).chain([97, 1000]) {
                for count in 1..=12u32 {
                    let mut seen = vec![0u32; len];
                    for rank in 0..count {
                        let shard = shard_indices(len, rank, count, &opts);
                        assert_eq!(shard.len(), len / count as usize, "len {len} count {count} {opts:?}");
                        for i in shard {
                            seen[i] += 1;
                        }
                    }
                    assert!(seen.iter().all(|&n| n <= 1));
                    assert_eq!(seen.iter().filter(|&&n| n == 1).count(), len / count as usize * count as usize);
                }
            }
        }
    }

    #[test]
    fn stride_and_contiguous_layouts() {
        let stride = ShardOptions::default();
        assert_eq!(shard_indices(10, 0, 3, &stride), [0, 3, 6, 9]);
        assert_eq!(shard_indices(10, 2, 3, &stride), [2, 5, 8]);
        assert_eq!(shard_indices(10, 2, 3, &stride.clone().drop_last(true)), [2, 5, 8]);
        assert_eq!(shard_indices(10, 0, 3, &stride.drop_last(true)), [0, 3, 6]);

        let contiguous = ShardOptions::contiguous();
        assert_eq!(shard_indices(10, 0, 3, &contiguous), [0, 1, 2, 3]);
        assert_eq!(shard_indices(10, 1, 3, &contiguous), [4, 5, 6]);
        assert_eq!(shard_indices(10, 2, 3, &contiguous), [7, 8, 9]);
        assert_eq!(shard_indices(10, 2, 3, &contiguous.clone().drop_last(true)), [6, 7, 8]);
        // More ranks than items: the last ranks get nothing.
        assert_eq!(shard_indices(2, 1, 4, &contiguous), [1]);
        assert!(shard_indices(2, 3, 4, &contiguous).is_empty());
    }

    #[test]
    fn impossible_rank_or_count_gives_nothing() {
        for opts in all_options() {
            assert!(shard_indices(10, 0, 0, &opts).is_empty());
            assert!(shard_indices(10, 3, 3, &opts).is_empty());
            assert!(shard_indices(10, u32::MAX, 2, &opts).is_empty());
        }
        let data = vec![1, 2, 3];
        assert!(shard_with(&data, 5, 2, &ShardOptions::default()).is_empty());
    }

    #[test]
    fn shuffle_is_deterministic_and_depends_on_the_seed() {
        let a = ShardOptions::default().shuffle(7);
        let b = ShardOptions::default().shuffle(8);
        let first = shard_indices(1000, 1, 4, &a);
        assert_eq!(first, shard_indices(1000, 1, 4, &a));
        assert_ne!(first, shard_indices(1000, 1, 4, &b));
        assert_ne!(first, shard_indices(1000, 1, 4, &ShardOptions::default()));
        // A permutation of 0..len.
        let mut p = permutation(1000, 7);
        p.sort_unstable();
        assert!(p.into_iter().eq(0..1000));
    }

    #[test]
    fn shuffle_is_the_same_on_every_platform() {
        // Pinned values: a change here changes which node gets which item across versions.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(permutation(10, 42), PERMUTATION_10_SEED_42);
    }

    const PERMUTATION_10_SEED_42: [usize; 10] = [8, 3, 6, 5, 4, 0, 9, 2, 1, 7];

    #[test]
    fn slices_vectors_and_tuples() {
        let data: Vec<u32> = (0..10).collect();
        let opts = ShardOptions::default();
        assert_eq!(shard_with(&data, 1, 3, &opts), [1, 4, 7]);
        assert_eq!(shard_with(&data[..], 1, 3, &opts), [1, 4, 7]);
        assert_eq!(shard_with(&data[2..5], 0, 2, &ShardOptions::contiguous()), [2, 3]);

        let names: Vec<String> = (0..10).map(|i| format!("item {i}")).collect();
        let squares: Vec<u64> = (0..10).map(|i| i * i).collect();
        let (n, s) = shard_with(&(&names, &squares[..]), 0, 3, &opts);
        assert_eq!(n, ["item 0", "item 3", "item 6", "item 9"]);
        assert_eq!(s, [0, 9, 36, 81]);
    }

    #[test]
    fn tuples_stay_aligned_under_shuffle() {
        let ids: Vec<u32> = (0..500).collect();
        let doubled: Vec<u64> = (0..500).map(|i| 2 * i).collect();
        let labels: Vec<String> = (0..500).map(|i| i.to_string()).collect();
        let flags: Vec<bool> = (0..500).map(|i| i % 3 == 0).collect();
        let opts = ShardOptions::contiguous().shuffle(99);
        let mut total = 0;
        for rank in 0..3 {
            let (a, b, c, d) = shard_with(&(&ids, &doubled, &labels[..], &flags), rank, 3, &opts);
            assert_eq!(a.len(), b.len());
            assert!(a.windows(2).any(|w| w[0] > w[1]), "shuffled");
            for (((a, b), c), d) in a.iter().zip(&b).zip(&c).zip(&d) {
                assert_eq!(u64::from(*a) * 2, *b);
                assert_eq!(a.to_string(), *c);
                assert_eq!(a % 3 == 0, *d);
            }
            let (x, y, z) = shard_with(&(&ids, &doubled, &labels), rank, 3, &opts);
            assert_eq!((x.len(), y.len(), z.len()), (a.len(), a.len(), a.len()));
            total += a.len();
        }
        assert_eq!(total, 500);
    }

    #[test]
    fn mismatched_tuple_lengths_use_the_shortest() {
        let long: Vec<u32> = (0..10).collect();
        let short: Vec<u32> = (0..4).collect();
        let pair = (&long, &short);
        assert_eq!(pair.shard_len(), 4);
        let (a, b) = shard_with(&pair, 0, 2, &ShardOptions::default());
        assert_eq!((a, b), (vec![0, 2], vec![0, 2]));
        // Direct shard_by with out-of-range indices keeps members in step.
        let (a, b) = pair.shard_by(&[9, 1, 5, 3]);
        assert_eq!((a, b), (vec![1, 3], vec![1, 3]));
        assert_eq!(long.shard_by(&[9, 100]), [9]);
    }
}
