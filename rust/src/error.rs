//! The core's error type.
//!
//! Every variant maps to exactly one Python exception class (see the bindings'
//! `errors.rs`), so a message written here is what a Python user reads. Messages
//! name the argument, what was expected and what was found.

use std::fmt;

/// A shape rendered the way numpy prints it: `(3, 1535)`, `(7,)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape(pub Vec<usize>);

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "({one},)"),
            dims => {
                let parts: Vec<String> = dims.iter().map(usize::to_string).collect();
                write!(f, "({})", parts.join(", "))
            }
        }
    }
}

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An array has the wrong rank or extent. `expected` is human-readable,
    /// e.g. `(n, 1536)`.
    #[error("{arg} must have shape {expected}; got {found}")]
    Shape {
        arg: &'static str,
        expected: String,
        found: Shape,
    },

    /// An array has no elements where at least one is needed.
    #[error("{arg} must not be empty; got shape {found}")]
    Empty { arg: &'static str, found: Shape },

    /// An array has an unsupported element type.
    #[error("{arg} must have dtype {expected}; got {found}")]
    DType {
        arg: &'static str,
        expected: String,
        found: String,
    },

    /// A scalar argument or array content is out of its domain
    /// (NaN where finite values are required, an unsupported bit width...).
    #[error("{arg} must be {expected}; got {found}")]
    Value {
        arg: &'static str,
        expected: String,
        found: String,
    },

    /// An index is out of range. Never clamped silently.
    #[error("{arg} index {index} is out of range for length {len}")]
    Index {
        arg: &'static str,
        index: i64,
        len: usize,
    },

    /// A file or buffer is malformed, truncated or of an unknown version.
    #[error("{what}: {detail}")]
    Format { what: String, detail: String },

    /// The requested SIMD level cannot run on this CPU or is unknown.
    #[error(
        "NEUROPIL_KERNEL={requested} is not usable here: {reason} (this CPU supports: {supported})"
    )]
    Kernel {
        requested: String,
        reason: String,
        supported: String,
    },

    /// The thread pool could not be configured.
    #[error("{0}")]
    Threads(String),

    /// A file could not be opened, read or written. Kept apart from
    /// [`Error::Format`] (a file that was read but is malformed) so that the
    /// bindings raise the `OSError` subclass Python's own `open` would
    /// (`FileNotFoundError`, `IsADirectoryError`, `PermissionError`...).
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    /// An operating-system I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result alias used throughout the core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Value`].
    pub fn value(arg: &'static str, expected: impl Into<String>, found: impl fmt::Display) -> Self {
        Error::Value {
            arg,
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    /// Shorthand for [`Error::File`]: `action` is "read" or "write".
    pub fn file(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Error::File {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(arg: &'static str, expected: impl Into<String>, found: &[usize]) -> Self {
        Error::Shape {
            arg,
            expected: expected.into(),
            found: Shape(found.to_vec()),
        }
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Format {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_message_names_argument_expected_and_found() {
        let e = Error::shape("x", "(n, 1536)", &[3, 1535]);
        assert_eq!(e.to_string(), "x must have shape (n, 1536); got (3, 1535)");
        let e = Error::shape("v", "(4,)", &[7]);
        assert_eq!(e.to_string(), "v must have shape (4,); got (7,)");
    }
}
