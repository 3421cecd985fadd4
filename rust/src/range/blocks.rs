//! Keys packed in blocks of 16, dimension-major, with their ids.
//!
//! The layout [`super::kernel`] reads. A block's unused lanes (only at the end
//! of a set, or at the end of a k-means leaf) hold zeros and the id
//! [`PAD`], and are never reported.

use super::kernel::LANES;

/// Id of an unused lane.
pub const PAD: u32 = u32::MAX;

/// Keys in blocks of [`LANES`], `data[b * d * 16 + j * 16 + lane]`.
#[derive(Debug, Clone, Default)]
pub struct BlockSet {
    pub d: usize,
    pub data: Vec<f32>,
    pub ids: Vec<u32>,
    /// Number of real (non-padding) keys.
    pub len: usize,
    /// Lanes used in the last block; 0 means closed (the next push opens a block).
    fill: usize,
}

impl BlockSet {
    pub fn new(d: usize) -> Self {
        BlockSet {
            d,
            ..Default::default()
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.ids.len() / LANES
    }

    /// The `b`-th block's floats.
    #[inline]
    pub fn block(&self, b: usize) -> &[f32] {
        let w = self.d * LANES;
        &self.data[b * w..(b + 1) * w]
    }

    /// Ids of the `b`-th block's lanes.
    #[inline]
    pub fn block_ids(&self, b: usize) -> &[u32] {
        &self.ids[b * LANES..(b + 1) * LANES]
    }

    /// Appends one key in the next free lane of the last block (a new block
    /// when it is full or closed): amortised O(d).
    pub fn push(&mut self, id: u32, key: &[f32]) {
        let d = self.d;
        if self.fill == 0 || self.fill == LANES {
            self.data.resize(self.data.len() + d * LANES, 0.0);
            self.ids.resize(self.ids.len() + LANES, PAD);
            self.fill = 0;
        }
        let (b, lane) = (self.blocks() - 1, self.fill);
        for (j, &x) in key.iter().enumerate() {
            self.data[b * d * LANES + j * LANES + lane] = x;
        }
        self.ids[b * LANES + lane] = id;
        self.fill += 1;
        self.len += 1;
    }

    /// Closes the last block: the next key starts a new one (k-means leaves
    /// begin on a block boundary).
    pub fn align(&mut self) {
        self.fill = 0;
    }

    /// Writes the keys back into `out` (n x d, row-major, by id).
    pub fn scatter(&self, out: &mut [f32]) {
        let d = self.d;
        for (pos, &id) in self.ids.iter().enumerate() {
            if id == PAD {
                continue;
            }
            let (b, lane) = (pos / LANES, pos % LANES);
            for j in 0..d {
                out[id as usize * d + j] = self.data[b * d * LANES + j * LANES + lane];
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4 + self.ids.len() * 4
    }
}
