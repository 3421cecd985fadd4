//! The FFN activations, applied one value at a time in the kernels.

use crate::error::{Error, Result};

/// The FFN's non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU's gate, Llama, SmolLM2).
    Silu,
    /// `x * Phi(x)` with the exact (erf) normal CDF (BERT, MiniLM).
    Gelu,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parses `silu`, `gelu` or `relu`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            _ => Err(Error::value(
                "activation",
                "one of 'silu', 'gelu', 'relu'",
                format!("{name:?}"),
            )),
        }
    }

    /// Applies the activation to one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::Relu => x.max(0.0),
        }
    }
}

/// erf with relative error below 1.2e-7 (Numerical Recipes' Chebyshev fit of erfc).
fn erf(x: f32) -> f32 {
    let z = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    (if x >= 0.0 { 1.0 - r } else { r - 1.0 }) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_accurate() {
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (-2.0, -0.995_322_265),
        ] {
            assert!((erf(x) as f64 - want).abs() < 1e-6, "{x}");
        }
    }

    #[test]
    fn parse_names() {
        assert_eq!(Activation::parse("silu").unwrap(), Activation::Silu);
        assert!(Activation::parse("tanh").is_err());
        assert_eq!(Activation::Relu.apply(-1.0), 0.0);
        assert!((Activation::Silu.apply(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
