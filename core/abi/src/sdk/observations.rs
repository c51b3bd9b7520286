//! The on-demand observations of contract 2 as a policy reads them:
//! [`Blocks`] (per-block tokens and Gram matrices), [`AccGradNorms`], and
//! the SP loss that compares two Gram matrices.

use super::{not_asked, Matrix, PolicyError};
use crate::ffi;

/// Per-block reductions of one set of samples (the batch or the probe
/// batch) through one model (the model or the reference snapshot), as the
/// host handed them: [`Blocks::tokens`] and [`Blocks::gram`] per block.
#[derive(Debug, Clone, Copy)]
pub struct Blocks<'a> {
    first: usize,
    blocks: usize,
    rows: usize,
    dim: usize,
    tokens: &'a [f32],
    grams: &'a [f32],
}

impl<'a> Blocks<'a> {
    pub(crate) fn from_ffi(b: &ffi::BlockObservations<'a>) -> Result<Self, PolicyError> {
        let (first, blocks) = (b.first as usize, b.blocks as usize);
        let (rows, dim) = (b.rows as usize, b.dim as usize);
        let ok = |len: usize, per: usize| len == 0 || Some(len) == blocks.checked_mul(per);
        if !ok(b.tokens.len(), rows * dim) || !ok(b.grams.len(), rows * rows) {
            return Err(PolicyError::invalid(format!(
                "block observations of {blocks} blocks x {rows} rows x {dim} with {} token and \
                 {} gram values",
                b.tokens.len(),
                b.grams.len()
            )));
        }
        Ok(Blocks {
            first,
            blocks,
            rows,
            dim,
            tokens: b.tokens.as_slice(),
            grams: b.grams.as_slice(),
        })
    }

    /// The blocks observed, `first..first + count`.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.blocks
    }

    /// Samples observed (B).
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn index(&self, block: usize) -> Result<usize, PolicyError> {
        if self.range().contains(&block) {
            Ok(block - self.first)
        } else {
            Err(PolicyError::invalid(format!(
                "block {block} was not observed (blocks {:?} were)",
                self.range()
            )))
        }
    }

    /// Block `block`'s pooled output token per sample, `B × D` (the class
    /// token, or the mean of the patch tokens for a model without one;
    /// before the final norm). Needs [`Needs::BLOCK_TOKENS`](crate::ffi::Needs::BLOCK_TOKENS) asked for.
    pub fn tokens(&self, block: usize) -> Result<Matrix<'a>, PolicyError> {
        let i = self.index(block)?;
        if self.tokens.is_empty() {
            return Err(not_asked("block tokens", "BLOCK_TOKENS"));
        }
        let n = self.rows * self.dim;
        Matrix::new(&self.tokens[i * n..(i + 1) * n], self.rows, self.dim)
            .ok_or_else(|| PolicyError::invalid("token buffer of the wrong size"))
    }

    /// Block `block`'s `B × B` similarity matrix: `G = A Aᵀ` of the
    /// flattened outputs `A` (`B × T·D`), each row divided by its L2 norm
    /// (Tung & Mori's SP loss compares two of these). Needs
    /// [`Needs::BLOCK_GRAMS`](crate::ffi::Needs::BLOCK_GRAMS) asked for.
    pub fn gram(&self, block: usize) -> Result<Matrix<'a>, PolicyError> {
        let i = self.index(block)?;
        if self.grams.is_empty() {
            return Err(not_asked("block Gram matrices", "BLOCK_GRAMS"));
        }
        let n = self.rows * self.rows;
        Matrix::new(&self.grams[i * n..(i + 1) * n], self.rows, self.rows)
            .ok_or_else(|| PolicyError::invalid("gram buffer of the wrong size"))
    }
}

/// Per-block norms of the gradient accumulated since the last read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccGradNorms<'a> {
    /// L1 norm of each block's summed gradient.
    pub l1: &'a [f64],
    /// L2 norm of each block's summed gradient.
    pub l2: &'a [f64],
    /// Steps the sum covers.
    pub steps: u64,
}

/// SP loss (Tung & Mori 2019) of two row-normalised `B × B` similarity
/// matrices ([`Blocks::gram`]): `‖a − b‖²_F / B²`.
pub fn sp_loss(a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
    if a.rows() != b.rows() || a.cols() != b.cols() || a.rows() != a.cols() {
        return Err(PolicyError::invalid(format!(
            "SP loss of a {}x{} and a {}x{} matrix (two B x B matrices expected)",
            a.rows(),
            a.cols(),
            b.rows(),
            b.cols()
        )));
    }
    let sum: f64 = a
        .as_slice()
        .iter()
        .zip(b.as_slice())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let n = a.rows().max(1) as f64;
    Ok(sum / (n * n))
}
