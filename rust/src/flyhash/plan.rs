//! How a sparse projection is stored: the order the sparse kernel reads it in.
//!
//! The kernel sums, per input block `b` and output row `r`, the row's +1
//! connections into the block (`P_rb`) and its -1 connections (`N_rb`), each
//! into four partial sums by position mod 4 (see [`super::kernels`]). The part
//! lengths vary from row to row (binomially, about 19 at the issue size), so
//! walking rows in index order makes every loop exit a coin toss for the
//! branch predictor: about four mispredictions per row and block, which cost
//! more than the additions. Rows are therefore stored, per block, sorted by
//! `(|P_rb|, |N_rb|)` (ties in row order): consecutive rows run loops of the
//! same lengths, so the branches are predicted, and the rows of one shape form
//! a [`Group`]. The additions of each row are unchanged, so the activations
//! do not depend on this order.
//!
//! Per block, the connections of its rows follow one another in that order,
//! each row's `P_rb` then `N_rb` in stored (ascending) order, as the offset in
//! bytes of the input's lane in the kernel's block of lanes: `(i - lo) * 64`
//! for input `i` of a block starting at `lo`. The kernel adds that offset to a
//! base pointer; nothing is subtracted, shifted or bounds-checked per addition.
//!
//! The row-major form (each row's +1 connections, then its -1 ones, each in
//! ascending order: what files hold and `projection_arrays` returns) is
//! rebuilt from the plan on demand by [`Plan::row_major`].

use super::projection::{sparse_blocks, SPARSE_BLOCK};

/// Bytes between consecutive lanes of the kernel's block of inputs (16 f32).
pub const LANE_BYTES: usize = 64;

/// Rows of one block with the same part lengths, consecutive in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// Connections per row into the block with weight +1, and with -1.
    pub pos: u16,
    pub neg: u16,
    /// Number of rows.
    pub rows: u32,
}

/// The kernel's view of one input block.
pub struct Block<'a> {
    /// First input of the block.
    pub lo: usize,
    pub groups: &'a [Group],
    /// The block's rows in plan order (`m` of them).
    pub rows: &'a [u32],
    /// The rows' connections in plan order, as byte offsets (see the module doc).
    pub offs: &'a [u16],
}

/// A sparse projection in the kernel's order (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    d: usize,
    m: usize,
    c: usize,
    /// Per block, where its groups start in `groups` (`B + 1` entries).
    group_at: Vec<usize>,
    groups: Vec<Group>,
    /// `B * m` row numbers, block by block.
    rows: Vec<u32>,
    /// `m * c` offsets, block by block.
    offs: Vec<u16>,
    /// Per block, where its offsets start in `offs` (`B + 1` entries).
    off_at: Vec<usize>,
}

impl Plan {
    /// The plan of `m` rows of `c` connections over `d` inputs, from the
    /// row-major `indices` (`m * c`) and each row's count of +1 connections.
    pub(crate) fn new(d: usize, m: usize, c: usize, indices: &[u16], npos: &[usize]) -> Plan {
        debug_assert!(indices.len() == m * c && npos.len() == m && d <= u16::MAX as usize);
        let nblocks = sparse_blocks(d);
        // Row r's +1 and -1 parts in block b: each part is ascending, so block
        // b's connections lie between the positions where indices reach b's
        // start and its end.
        let part = |r: usize, b: usize| {
            let row = &indices[r * c..(r + 1) * c];
            let (pos, neg) = row.split_at(npos[r]);
            let at = |part: &[u16], i: usize| part.partition_point(|&x| (x as usize) < i);
            let (lo, hi) = (b * SPARSE_BLOCK, (b + 1) * SPARSE_BLOCK);
            (
                at(pos, lo)..at(pos, hi),
                npos[r] + at(neg, lo)..npos[r] + at(neg, hi),
            )
        };
        let mut plan = Plan {
            d,
            m,
            c,
            group_at: vec![0],
            groups: Vec::new(),
            rows: Vec::with_capacity(nblocks * m),
            offs: Vec::with_capacity(m * c),
            off_at: vec![0],
        };
        let mut order: Vec<(u16, u16, u32)> = Vec::with_capacity(m);
        for b in 0..nblocks {
            let lo = b * SPARSE_BLOCK;
            order.clear();
            order.extend((0..m).map(|r| {
                let (p, n) = part(r, b);
                (p.len() as u16, n.len() as u16, r as u32)
            }));
            order.sort_unstable();
            let first = plan.groups.len();
            for &(pos, neg, r) in &order {
                match plan.groups[first..].last_mut() {
                    Some(g) if (g.pos, g.neg) == (pos, neg) => g.rows += 1,
                    _ => plan.groups.push(Group { pos, neg, rows: 1 }),
                }
                plan.rows.push(r);
                let (p, n) = part(r as usize, b);
                let row = &indices[r as usize * c..];
                plan.offs.extend(
                    row[p]
                        .iter()
                        .chain(&row[n])
                        .map(|&i| ((i as usize - lo) * LANE_BYTES) as u16),
                );
            }
            plan.group_at.push(plan.groups.len());
            plan.off_at.push(plan.offs.len());
        }
        plan
    }

    /// Number of input blocks.
    pub fn blocks(&self) -> usize {
        self.group_at.len() - 1
    }

    /// Block `b < self.blocks()`.
    pub fn block(&self, b: usize) -> Block<'_> {
        Block {
            lo: b * SPARSE_BLOCK,
            groups: &self.groups[self.group_at[b]..self.group_at[b + 1]],
            rows: &self.rows[b * self.m..(b + 1) * self.m],
            offs: &self.offs[self.off_at[b]..self.off_at[b + 1]],
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.offs.len() * 2
            + self.rows.len() * 4
            + self.groups.len() * std::mem::size_of::<Group>()
            + (self.group_at.len() + self.off_at.len()) * std::mem::size_of::<usize>()
    }

    /// The row-major indices (`m * c`: each row's +1 connections, then its -1
    /// ones, each ascending) and each row's count of +1 connections.
    pub fn row_major(&self) -> (Vec<u16>, Vec<usize>) {
        let (m, c) = (self.m, self.c);
        let mut npos = vec![0usize; m];
        for b in 0..self.blocks() {
            let blk = self.block(b);
            let mut rows = blk.rows.iter();
            for g in blk.groups {
                for &r in rows.by_ref().take(g.rows as usize) {
                    npos[r as usize] += g.pos as usize;
                }
            }
        }
        let mut indices = vec![0u16; m * c];
        // Next free position of each row's +1 and -1 parts.
        let mut next_pos: Vec<usize> = (0..m).map(|r| r * c).collect();
        let mut next_neg: Vec<usize> = (0..m).map(|r| r * c + npos[r]).collect();
        for b in 0..self.blocks() {
            let blk = self.block(b);
            let (mut rows, mut offs) = (blk.rows.iter(), blk.offs.iter());
            let input = |o: &u16| (blk.lo + *o as usize / LANE_BYTES) as u16;
            for g in blk.groups {
                for &r in rows.by_ref().take(g.rows as usize) {
                    let r = r as usize;
                    for o in offs.by_ref().take(g.pos as usize) {
                        indices[next_pos[r]] = input(o);
                        next_pos[r] += 1;
                    }
                    for o in offs.by_ref().take(g.neg as usize) {
                        indices[next_neg[r]] = input(o);
                        next_neg[r] += 1;
                    }
                }
            }
        }
        debug_assert!(self.d > 0);
        (indices, npos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_grouped_by_shape_and_row_major_round_trips() {
        // 3 rows over 2 blocks (d = 500), c = 4; row r's +1 part first.
        let (d, m, c) = (500, 3, 4);
        let indices: Vec<u16> = vec![
            1, 400, 2, 450, // row 0: +1 {1, 400}, -1 {2, 450}
            3, 5, 7, 499, // row 1: +1 {3, 5, 7}, -1 {499}
            390, 10, 20, 30, // row 2: +1 {390}, -1 {10, 20, 30}
        ];
        let npos = vec![2, 3, 1];
        let p = Plan::new(d, m, c, &indices, &npos);
        assert_eq!(p.blocks(), 2);
        let b0 = p.block(0);
        // Block 0 shapes: row 0 (1, 1), row 1 (3, 0), row 2 (0, 3).
        assert_eq!(b0.rows, [2, 0, 1]);
        assert_eq!(
            b0.groups,
            [
                Group {
                    pos: 0,
                    neg: 3,
                    rows: 1
                },
                Group {
                    pos: 1,
                    neg: 1,
                    rows: 1
                },
                Group {
                    pos: 3,
                    neg: 0,
                    rows: 1
                }
            ]
        );
        let o = |i: u16, lo: u16| (i - lo) * LANE_BYTES as u16;
        assert_eq!(
            b0.offs,
            [
                o(10, 0),
                o(20, 0),
                o(30, 0),
                o(1, 0),
                o(2, 0),
                o(3, 0),
                o(5, 0),
                o(7, 0)
            ]
        );
        let b1 = p.block(1);
        // Block 1 shapes: row 0 (1, 1), row 1 (0, 1), row 2 (1, 0).
        assert_eq!(b1.rows, [1, 2, 0]);
        assert_eq!(
            b1.offs,
            [o(499, 384), o(390, 384), o(400, 384), o(450, 384)]
        );
        assert_eq!(p.row_major(), (indices, npos));
    }
}
