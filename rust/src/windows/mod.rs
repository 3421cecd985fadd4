//! Lazy sliding windows: batches of `window` consecutive frames, sliced from
//! the frames on demand instead of materialised up front.
//!
//! - [`layout`]: episodes, window counts and window index -> first frame
//!   (O(episodes) memory, no window ever crosses an episode boundary).
//! - [`order`]: the seeded per-epoch permutation (SplitMix64 + Fisher-Yates,
//!   documented bit for bit) and `DistributedSampler`-style sharding.
//! - [`gather`](mod@gather): the parallel byte-wise gather of windows into a batch buffer.

pub mod gather;
pub mod layout;
pub mod order;

pub use gather::{gather, overlaps, Rows};
pub use layout::Layout;
pub use order::{batch_count, epoch_order, epoch_order_of, permutation, shard_len, WindowIndex};
