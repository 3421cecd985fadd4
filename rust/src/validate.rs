//! Argument checks shared by every entry point, so each capability reports bad
//! input with the same wording.

use crate::error::{Error, Result};

/// Fails with [`Error::Value`] naming the first non-finite element, if any.
///
/// Scans blocks without early exit (a branch-free OR of the exponent test, which
/// LLVM vectorises), so a clean array costs one pass near memory speed; only a
/// block that holds a non-finite value is searched element by element.
pub fn finite(arg: &'static str, data: &[f32]) -> Result<()> {
    const BLOCK: usize = 1024;
    const EXP: u32 = 0x7f80_0000;
    for (b, block) in data.chunks(BLOCK).enumerate() {
        let bad = block
            .iter()
            .fold(false, |acc, v| acc | (v.to_bits() & EXP == EXP));
        if bad {
            let i = block.iter().position(|v| !v.is_finite()).unwrap_or(0) + b * BLOCK;
            return Err(Error::value(
                arg,
                "finite (no NaN or Inf)",
                format!("{} at flat index {i}", data[i]),
            ));
        }
    }
    Ok(())
}

/// Fails unless `data` is non-empty.
pub fn non_empty(arg: &'static str, shape: &[usize]) -> Result<()> {
    if shape.iter().product::<usize>() == 0 {
        return Err(Error::Empty {
            arg,
            found: crate::error::Shape(shape.to_vec()),
        });
    }
    Ok(())
}

/// Fails if any axis but the first is 0. The first axis is a batch (rows,
/// queries, thresholds), which may hold 0 items: an empty batch gives an empty
/// result, as in numpy and torch. The message names the whole shape.
pub fn non_empty_rows(arg: &'static str, shape: &[usize]) -> Result<()> {
    if shape.iter().skip(1).any(|&s| s == 0) {
        return Err(Error::Empty {
            arg,
            found: crate::error::Shape(shape.to_vec()),
        });
    }
    Ok(())
}

/// Fails unless two lengths agree; `expected` describes the partner argument.
pub fn same_len(arg: &'static str, found: usize, expected: usize, partner: &str) -> Result<()> {
    if found != expected {
        return Err(Error::shape(
            arg,
            format!("({expected},) to match {partner}"),
            &[found],
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_reports_position() {
        assert!(finite("x", &[1.0, 2.0]).is_ok());
        let msg = finite("x", &[1.0, f32::NAN]).unwrap_err().to_string();
        assert_eq!(
            msg,
            "x must be finite (no NaN or Inf); got NaN at flat index 1"
        );
        let mut long = vec![0.5f32; 5000];
        long[4321] = f32::NEG_INFINITY;
        let msg = finite("w", &long).unwrap_err().to_string();
        assert!(msg.ends_with("got -inf at flat index 4321"), "{msg}");
    }

    #[test]
    fn empty_is_rejected() {
        assert!(non_empty("x", &[3, 0]).is_err());
        assert!(non_empty("x", &[3, 2]).is_ok());
    }

    #[test]
    fn only_the_batch_axis_may_be_empty() {
        assert!(non_empty_rows("x", &[0, 4]).is_ok());
        assert!(non_empty_rows("x", &[3, 4]).is_ok());
        let msg = non_empty_rows("x", &[3, 0]).unwrap_err().to_string();
        assert_eq!(msg, "x must not be empty; got shape (3, 0)");
        assert!(non_empty_rows("x", &[0, 0]).is_err());
        assert!(non_empty_rows("thresholds", &[0]).is_ok());
    }
}
