//! The packed layout of a quantized (rows, cols) matrix, and its validation.
//!
//! A row is cut into groups of `group_size` consecutive weights (32, 64, 128 or
//! 256). A row whose length is not a multiple of the group size is padded with
//! zeros up to the next multiple; the padding is quantized with its group, never
//! returned by `dequantize`, and multiplied by zero activations in the kernels.
//!
//! Each weight becomes an unsigned code `u` of `bits` bits (2, 3, 4 or 8):
//! - asymmetric (`Asym`, GGUF `Q4_1`): `w = scale * u + min`;
//! - symmetric (`Sym`, GGUF `Q4_0`, `Q8_0`): `w = scale * (u - 2^(bits-1))`.
//!
//! Codes are packed per group so that SIMD kernels read contiguous activations:
//! - 8 bits: one byte per weight;
//! - 4 bits: byte `j` (of `g/2`) holds `u[j]` (low nibble) and `u[j + g/2]`
//!   (high nibble), which for `g = 32` is exactly GGUF's `Q4_0`/`Q4_1` order;
//! - 2 bits: byte `j` (of `g/4`) holds `u[j + k*g/4]` in bits `2k..2k+2`, k = 0..4;
//! - 3 bits: the low two bits as the 2-bit layout (`g/4` bytes), then the high
//!   bit planes: byte `j` (of `g/8`) holds bit 2 of `u[j + k*g/8]` in bit `k`.
//!
//! Scales and mins are one per group, row-major, float16 (default) or float32.

use crate::error::{Error, Result};

/// How a group's weights map to codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `w = scale * u + min`, scale and min from the group's range.
    Asym,
    /// `w = scale * (u - 2^(bits-1))`, scale from the group's largest magnitude.
    Sym,
    /// GGUF `Q4_0`: 4-bit symmetric, groups of 32, ggml's rounding.
    Q4_0,
    /// GGUF `Q4_1`: 4-bit asymmetric, groups of 32, ggml's rounding.
    Q4_1,
    /// GGUF `Q8_0`: 8-bit symmetric, groups of 32, ggml's rounding.
    Q8_0,
}

impl Scheme {
    /// Every scheme, in the order error messages list them.
    pub const ALL: [Scheme; 5] = [
        Scheme::Asym,
        Scheme::Sym,
        Scheme::Q4_0,
        Scheme::Q4_1,
        Scheme::Q8_0,
    ];

    /// Lower-case name as the Python API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Asym => "asym",
            Scheme::Sym => "sym",
            Scheme::Q4_0 => "q4_0",
            Scheme::Q4_1 => "q4_1",
            Scheme::Q8_0 => "q8_0",
        }
    }

    /// Parses a scheme name (case-insensitive).
    pub fn parse(name: &str) -> Result<Scheme> {
        Scheme::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                Error::value(
                    "scheme",
                    "one of asym, sym, q4_0, q4_1, q8_0",
                    format!("{name:?}"),
                )
            })
    }

    /// Whether groups carry a min (asymmetric) besides the scale.
    pub fn has_min(self) -> bool {
        matches!(self, Scheme::Asym | Scheme::Q4_1)
    }

    /// The fixed (bits, group size) of a GGUF block format; `None` for asym/sym.
    pub fn gguf_shape(self) -> Option<(u8, usize)> {
        match self {
            Scheme::Q4_0 | Scheme::Q4_1 => Some((4, 32)),
            Scheme::Q8_0 => Some((8, 32)),
            Scheme::Asym | Scheme::Sym => None,
        }
    }
}

/// Storage type of scales and mins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleType {
    /// IEEE half precision (2 bytes), the default.
    F16,
    /// IEEE single precision (4 bytes).
    F32,
}

impl ScaleType {
    pub fn name(self) -> &'static str {
        match self {
            ScaleType::F16 => "float16",
            ScaleType::F32 => "float32",
        }
    }

    pub fn parse(name: &str) -> Result<ScaleType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "float16" | "f16" => Ok(ScaleType::F16),
            "float32" | "f32" => Ok(ScaleType::F32),
            _ => Err(Error::value(
                "scale_dtype",
                "float16 or float32",
                format!("{name:?}"),
            )),
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            ScaleType::F16 => 2,
            ScaleType::F32 => 4,
        }
    }
}

/// Bit width, group size and scheme, validated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    pub bits: u8,
    pub group_size: usize,
    pub scheme: Scheme,
    pub scale_type: ScaleType,
}

impl Params {
    /// Validates a combination: bits in {2, 3, 4, 8}, group size in
    /// {32, 64, 128, 256}; GGUF schemes fix both (4 or 8 bits, groups of 32)
    /// and float16 scales.
    pub fn new(bits: u8, group_size: usize, scheme: Scheme, scale_type: ScaleType) -> Result<Self> {
        if !matches!(bits, 2 | 3 | 4 | 8) {
            return Err(Error::value("bits", "one of 2, 3, 4, 8", bits));
        }
        if !matches!(group_size, 32 | 64 | 128 | 256) {
            return Err(Error::value(
                "group_size",
                "one of 32, 64, 128, 256",
                group_size,
            ));
        }
        if let Some((b, g)) = scheme.gguf_shape() {
            if bits != b || group_size != g {
                return Err(Error::value(
                    "bits/group_size",
                    format!("{b}/{g} for scheme {}", scheme.name()),
                    format!("{bits}/{group_size}"),
                ));
            }
            if scale_type != ScaleType::F16 {
                return Err(Error::value(
                    "scale_dtype",
                    format!("float16 for scheme {}", scheme.name()),
                    scale_type.name(),
                ));
            }
        }
        Ok(Params {
            bits,
            group_size,
            scheme,
            scale_type,
        })
    }

    /// Largest code, `2^bits - 1`.
    pub fn max_code(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Code that means zero in symmetric schemes, `2^(bits-1)`.
    pub fn offset(&self) -> u32 {
        1u32 << (self.bits - 1)
    }

    /// Bytes of packed codes per group.
    pub fn group_bytes(&self) -> usize {
        self.group_size * self.bits as usize / 8
    }

    /// Row length after padding to a whole number of groups.
    pub fn padded_cols(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_size) * self.group_size
    }

    /// Groups per row.
    pub fn groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_size)
    }

    /// Bytes of packed codes per row.
    pub fn row_bytes(&self, cols: usize) -> usize {
        self.groups(cols) * self.group_bytes()
    }

    /// Total storage (codes, scales, mins) of a (rows, cols) matrix.
    pub fn memory_bytes(&self, rows: usize, cols: usize) -> usize {
        let per_group = if self.scheme.has_min() { 2 } else { 1 } * self.scale_type.bytes();
        rows * (self.row_bytes(cols) + self.groups(cols) * per_group)
    }
}

/// Scales or mins, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum ScaleSlice<'a> {
    /// float16 bit patterns.
    F16(&'a [u16]),
    F32(&'a [f32]),
}

impl ScaleSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            ScaleSlice::F16(s) => s.len(),
            ScaleSlice::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn scale_type(&self) -> ScaleType {
        match self {
            ScaleSlice::F16(_) => ScaleType::F16,
            ScaleSlice::F32(_) => ScaleType::F32,
        }
    }

    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            ScaleSlice::F16(s) => half::f16::from_bits(s[i]).to_f32(),
            ScaleSlice::F32(s) => s[i],
        }
    }

    /// Elements `start..start + out.len()` as f32.
    pub fn read_into(&self, start: usize, out: &mut [f32]) {
        match self {
            ScaleSlice::F16(s) => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let src: &[half::f16] = s[start..start + out.len()].reinterpret_cast();
                src.convert_to_f32_slice(out);
            }
            ScaleSlice::F32(s) => out.copy_from_slice(&s[start..start + out.len()]),
        }
    }
}

/// Scales or mins, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    F16(Vec<u16>),
    F32(Vec<f32>),
}

impl Scales {
    pub fn zeros(t: ScaleType, n: usize) -> Scales {
        match t {
            ScaleType::F16 => Scales::F16(vec![0; n]),
            ScaleType::F32 => Scales::F32(vec![0.0; n]),
        }
    }

    pub fn as_slice(&self) -> ScaleSlice<'_> {
        match self {
            Scales::F16(v) => ScaleSlice::F16(v),
            Scales::F32(v) => ScaleSlice::F32(v),
        }
    }
}

/// A quantized matrix, borrowed from buffers someone else owns (numpy arrays,
/// torch tensors): what every kernel reads.
#[derive(Debug, Clone, Copy)]
pub struct QuantRef<'a> {
    pub params: Params,
    pub rows: usize,
    pub cols: usize,
    /// `rows * params.row_bytes(cols)` bytes, row-major.
    pub data: &'a [u8],
    /// `rows * params.groups(cols)` scales.
    pub scales: ScaleSlice<'a>,
    /// As many mins as scales for asymmetric schemes, else `None`.
    pub mins: Option<ScaleSlice<'a>>,
}

impl<'a> QuantRef<'a> {
    /// Checks every length against the shape and parameters.
    pub fn new(
        params: Params,
        rows: usize,
        cols: usize,
        data: &'a [u8],
        scales: ScaleSlice<'a>,
        mins: Option<ScaleSlice<'a>>,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Empty {
                arg: "shape",
                found: crate::error::Shape(vec![rows, cols]),
            });
        }
        let want = rows
            .checked_mul(params.row_bytes(cols))
            .ok_or_else(|| Error::value("shape", "a size that fits in memory", rows))?;
        if data.len() != want {
            return Err(Error::shape(
                "data",
                format!("({want},) for {rows}x{cols} at {} bits", params.bits),
                &[data.len()],
            ));
        }
        let groups = rows * params.groups(cols);
        if scales.len() != groups {
            return Err(Error::shape(
                "scales",
                format!("({groups},) = rows x groups per row"),
                &[scales.len()],
            ));
        }
        if scales.scale_type() != params.scale_type {
            return Err(Error::DType {
                arg: "scales",
                expected: params.scale_type.name().into(),
                found: scales.scale_type().name().into(),
            });
        }
        match (params.scheme.has_min(), mins) {
            (true, None) => {
                return Err(Error::value(
                    "mins",
                    format!("present for scheme {}", params.scheme.name()),
                    "None",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::value(
                    "mins",
                    format!("None for scheme {}", params.scheme.name()),
                    "an array",
                ))
            }
            (true, Some(m)) => {
                if m.len() != groups {
                    return Err(Error::shape("mins", format!("({groups},)"), &[m.len()]));
                }
                if m.scale_type() != params.scale_type {
                    return Err(Error::DType {
                        arg: "mins",
                        expected: params.scale_type.name().into(),
                        found: m.scale_type().name().into(),
                    });
                }
            }
            (false, None) => {}
        }
        Ok(QuantRef {
            params,
            rows,
            cols,
            data,
            scales,
            mins,
        })
    }

    /// Packed bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.params.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.params.groups(self.cols)
    }

    /// Scales (and mins: the symmetric offset folded in, `-2^(bits-1) * scale`)
    /// of row `r` as f32, written to `s` and `m` (each `groups()` long).
    pub fn row_scales(&self, r: usize, s: &mut [f32], m: &mut [f32]) {
        self.row_scales_range(r, 0, s, m)
    }

    /// Like [`Self::row_scales`] for groups `k0..k0 + s.len()` of row `r`.
    pub fn row_scales_range(&self, r: usize, k0: usize, s: &mut [f32], m: &mut [f32]) {
        let g = self.groups();
        self.scales.read_into(r * g + k0, s);
        match self.mins {
            Some(mins) => mins.read_into(r * g + k0, m),
            None => {
                let off = -(self.params.offset() as f32);
                for (mi, si) in m.iter_mut().zip(s.iter()) {
                    *mi = off * si;
                }
            }
        }
    }

    /// Storage in bytes (codes, scales, mins).
    pub fn memory_bytes(&self) -> usize {
        self.params.memory_bytes(self.rows, self.cols)
    }
}

/// A quantized matrix that owns its buffers (what `quantize` returns).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeights {
    pub params: Params,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    pub scales: Scales,
    pub mins: Option<Scales>,
}

impl QuantizedWeights {
    /// The borrowed view the kernels take.
    pub fn view(&self) -> QuantRef<'_> {
        QuantRef {
            params: self.params,
            rows: self.rows,
            cols: self.cols,
            data: &self.data,
            scales: self.scales.as_slice(),
            mins: self.mins.as_ref().map(Scales::as_slice),
        }
    }

    /// Storage in bytes (codes, scales, mins).
    pub fn memory_bytes(&self) -> usize {
        self.params.memory_bytes(self.rows, self.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_validated() {
        let p = Params::new(4, 64, Scheme::Asym, ScaleType::F16).unwrap();
        // 4.5 bits per weight: 32 bytes of codes + 2 + 2 bytes of scale and min per 64.
        assert_eq!(p.memory_bytes(1, 64) * 8, 64 * 9 / 2);
        assert_eq!(p.padded_cols(65), 128);
        let e = Params::new(5, 64, Scheme::Asym, ScaleType::F16).unwrap_err();
        assert_eq!(e.to_string(), "bits must be one of 2, 3, 4, 8; got 5");
        let e = Params::new(4, 48, Scheme::Asym, ScaleType::F16).unwrap_err();
        assert!(e.to_string().contains("group_size"), "{e}");
        let e = Params::new(4, 64, Scheme::Q4_0, ScaleType::F16).unwrap_err();
        assert!(e.to_string().contains("4/32 for scheme q4_0"), "{e}");
        assert!(Scheme::parse("Q8_0").is_ok());
        assert!(Scheme::parse("nf4")
            .unwrap_err()
            .to_string()
            .contains("\"nf4\""));
    }

    #[test]
    fn views_check_lengths() {
        let p = Params::new(4, 32, Scheme::Asym, ScaleType::F16).unwrap();
        let data = vec![0u8; 2 * 16];
        let s = vec![0u16; 2];
        let ok = QuantRef::new(
            p,
            2,
            32,
            &data,
            ScaleSlice::F16(&s),
            Some(ScaleSlice::F16(&s)),
        );
        assert!(ok.is_ok());
        let bad = QuantRef::new(
            p,
            2,
            32,
            &data[1..],
            ScaleSlice::F16(&s),
            Some(ScaleSlice::F16(&s)),
        );
        assert!(bad
            .unwrap_err()
            .to_string()
            .starts_with("data must have shape"));
        let bad = QuantRef::new(p, 2, 32, &data, ScaleSlice::F16(&s), None);
        assert!(bad.unwrap_err().to_string().contains("mins"));
    }
}
