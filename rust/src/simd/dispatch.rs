//! Which instruction-set level the kernels use, decided once per process.
//!
//! Detection runs `is_x86_feature_detected!` / `is_aarch64_feature_detected!`
//! a single time and caches the answer in a `OnceLock`: kernels then branch on
//! a plain enum, which costs nothing measurable next to the work they do.
//! `NEUROPIL_KERNEL` overrides the choice; asking for a level the CPU lacks is
//! an error (never an illegal-instruction crash).

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// An instruction-set level a kernel can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Portable Rust, no explicit vector instructions. Always available.
    Scalar,
    /// x86-64 AVX2 + FMA (Haswell and later).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL (Skylake-SP and later); VNNI and VPOPCNTDQ are
    /// reported separately by [`cpu_features`] and checked by the kernels that use them.
    Avx512,
    /// AArch64 Advanced SIMD.
    Neon,
}

impl Level {
    /// Every level, in the order the override variable spells them.
    pub const ALL: [Level; 4] = [Level::Scalar, Level::Avx2, Level::Avx512, Level::Neon];

    /// Lower-case name, as accepted by `NEUROPIL_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Neon => "neon",
        }
    }

    /// Parses a level name (case-insensitive).
    pub fn parse(name: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU can run kernels compiled for this level.
    pub fn is_supported(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The levels this CPU supports, lowest first.
    pub fn supported() -> Vec<Level> {
        Level::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .collect()
    }

    /// The best level this CPU supports.
    pub fn best() -> Level {
        [Level::Avx512, Level::Avx2, Level::Neon]
            .into_iter()
            .find(|l| l.is_supported())
            .unwrap_or(Level::Scalar)
    }

    /// Fails unless this CPU supports the level, so an `*_at` call can never
    /// execute an instruction the CPU lacks.
    pub fn check(self) -> Result<Level> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(kernel_error(self.name(), "this CPU lacks the instructions"))
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn kernel_error(requested: &str, reason: &str) -> Error {
    let supported: Vec<&str> = Level::supported().iter().map(|l| l.name()).collect();
    Error::Kernel {
        requested: requested.to_string(),
        reason: reason.to_string(),
        supported: supported.join(", "),
    }
}

/// Resolves an override value (the content of `NEUROPIL_KERNEL`) to a level.
fn choose(requested: Option<&str>) -> Result<Level> {
    match requested.map(str::trim) {
        None | Some("") | Some("auto") => Ok(Level::best()),
        Some(name) => match Level::parse(name) {
            Some(l) => l.check(),
            None => Err(kernel_error(
                name,
                "unknown level (expected one of auto, scalar, avx2, avx512, neon)",
            )),
        },
    }
}

/// The process-wide level: the best the CPU has, or `NEUROPIL_KERNEL`.
///
/// Decided on first call and cached. An invalid override is an error on every
/// call (not only the first), so no kernel ever runs with a half-valid choice.
pub fn level() -> Result<Level> {
    // The error is kept whole (its fields), so every call reports the same
    // one, once (wrapping its text again repeated it).
    static CHOICE: OnceLock<std::result::Result<Level, (String, String, String)>> = OnceLock::new();
    let choice = CHOICE.get_or_init(|| {
        let requested = std::env::var("NEUROPIL_KERNEL").ok();
        choose(requested.as_deref()).map_err(|e| match e {
            Error::Kernel {
                requested,
                reason,
                supported,
            } => (requested, reason, supported),
            other => {
                let supported: Vec<&str> = Level::supported().iter().map(|l| l.name()).collect();
                (
                    requested.unwrap_or_default(),
                    other.to_string(),
                    supported.join(", "),
                )
            }
        })
    });
    match choice {
        Ok(l) => Ok(*l),
        Err((requested, reason, supported)) => Err(Error::Kernel {
            requested: requested.clone(),
            reason: reason.clone(),
            supported: supported.clone(),
        }),
    }
}

/// Resolves a per-call `level` argument: `None` is the process-wide [`level`];
/// a name must parse and be supported by this CPU.
pub fn resolve(requested: Option<&str>) -> Result<Level> {
    match requested {
        None => level(),
        Some(name) => Level::parse(name)
            .ok_or_else(|| {
                Error::value(
                    "level",
                    "one of scalar, avx2, avx512, neon",
                    format!("{name:?}"),
                )
            })?
            .check(),
    }
}

/// Optional CPU features some kernels use beyond their level's baseline.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") {
            found.push("avx2");
        }
        if has!("fma") {
            found.push("fma");
        }
        if has!("f16c") {
            found.push("f16c");
        }
        if has!("avx512f") {
            found.push("avx512f");
        }
        if has!("avx512bw") {
            found.push("avx512bw");
        }
        if has!("avx512vl") {
            found.push("avx512vl");
        }
        if has!("avx512vnni") {
            found.push("avx512vnni");
        }
        if has!("avx512vpopcntdq") {
            found.push("avx512vpopcntdq");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            found.push("dotprod");
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_is_always_supported_and_best_is_supported() {
        assert!(Level::Scalar.is_supported());
        assert!(Level::best().is_supported());
        assert_eq!(Level::supported()[0], Level::Scalar);
    }

    #[test]
    fn override_parsing() {
        assert_eq!(choose(None).unwrap(), Level::best());
        assert_eq!(choose(Some("auto")).unwrap(), Level::best());
        assert_eq!(choose(Some("SCALAR")).unwrap(), Level::Scalar);
        let err = choose(Some("sse9")).unwrap_err().to_string();
        assert!(err.contains("NEUROPIL_KERNEL=sse9"), "{err}");
        assert!(err.contains("unknown level"), "{err}");
        for l in Level::ALL {
            assert_eq!(choose(Some(l.name())).is_ok(), l.is_supported());
        }
    }

    #[test]
    fn resolve_parses_checks_and_defaults() {
        assert_eq!(resolve(Some("scalar")).unwrap(), Level::Scalar);
        let err = resolve(Some("sse9")).unwrap_err().to_string();
        assert_eq!(
            err,
            "level must be one of scalar, avx2, avx512, neon; got \"sse9\""
        );
        assert!(resolve(None).is_ok());
    }

    #[test]
    fn unsupported_level_is_an_error_not_a_crash() {
        #[cfg(target_arch = "x86_64")]
        let foreign = Level::Neon;
        #[cfg(not(target_arch = "x86_64"))]
        let foreign = Level::Avx2;
        let err = foreign.check().unwrap_err().to_string();
        assert!(err.contains("lacks the instructions"), "{err}");
    }
}
