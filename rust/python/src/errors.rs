//! The single place where core errors become Python exceptions.
//!
//! The exception classes are defined in Python (`neuropil/errors.py`) because
//! they inherit from two bases (`ShapeError` is a `NeuropilError` and a
//! `ValueError`), which a PyO3-created exception cannot.

use pyo3::exceptions::{PyIndexError, PyOSError};
use pyo3::prelude::*;

pyo3::import_exception!(neuropil.errors, NeuropilError);
pyo3::import_exception!(neuropil.errors, ShapeError);
pyo3::import_exception!(neuropil.errors, DTypeError);
pyo3::import_exception!(neuropil.errors, FormatError);
pyo3::import_exception!(neuropil.errors, ArgumentError);

/// Converts a core error into the matching Python exception.
pub fn to_py(err: neuropil::Error) -> PyErr {
    use neuropil::Error as E;
    let msg = err.to_string();
    match err {
        E::Shape { .. } | E::Empty { .. } => ShapeError::new_err(msg),
        E::DType { .. } => DTypeError::new_err(msg),
        E::Value { .. } => ArgumentError::new_err(msg),
        E::Index { .. } => PyIndexError::new_err(msg),
        E::Format { .. } => FormatError::new_err(msg),
        E::File { path, source, .. } => os_error(&path, &source, msg),
        E::Kernel { .. } | E::Threads(_) | E::Io(_) => NeuropilError::new_err(msg),
    }
}

/// `OSError(errno, strerror, filename)`: Python picks the subclass from the
/// errno (`FileNotFoundError`, `IsADirectoryError`, `PermissionError`...) and
/// prints it as its own `open` would, so a missing file reads the same from
/// every loader in the package.
fn os_error(path: &std::path::Path, source: &std::io::Error, msg: String) -> PyErr {
    match source.raw_os_error() {
        Some(code) => {
            // io::Error's text is strerror plus " (os error N)"; Python adds
            // "[Errno N]" itself.
            let text = source.to_string();
            let suffix = format!(" (os error {code})");
            let strerror = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
            let filename = path.to_string_lossy().into_owned();
            // On Windows the raw code is a Windows error code (GetLastError), not
            // an errno: passed as `winerror`, from which Python derives the errno
            // and the subclass, as for its own `open`.
            #[cfg(windows)]
            let args = (None::<i32>, strerror, filename, code);
            #[cfg(not(windows))]
            let args = (code, strerror, filename);
            PyOSError::new_err(args)
        }
        // A core error with its own text (a save refusing a write-protected
        // file, say): the errno of its kind, so Python picks the subclass
        // (`PermissionError`...) from it as for an OS error. These five
        // values are the same on Linux, macOS and Windows' C runtime.
        None => match errno_of(source.kind()) {
            Some(code) => PyOSError::new_err((
                code,
                source.to_string(),
                path.to_string_lossy().into_owned(),
            )),
            None => PyOSError::new_err(msg),
        },
    }
}

/// The errno Python's `OSError` maps to the exception of an I/O error kind.
fn errno_of(kind: std::io::ErrorKind) -> Option<i32> {
    use std::io::ErrorKind as K;
    Some(match kind {
        K::NotFound => 2,          // ENOENT: FileNotFoundError
        K::PermissionDenied => 13, // EACCES: PermissionError
        K::AlreadyExists => 17,    // EEXIST: FileExistsError
        K::NotADirectory => 20,    // ENOTDIR: NotADirectoryError
        K::IsADirectory => 21,     // EISDIR: IsADirectoryError
        _ => return None,
    })
}

/// `?`-friendly conversion: `core_call().or_raise()?`.
pub trait OrRaise<T> {
    fn or_raise(self) -> PyResult<T>;
}

impl<T> OrRaise<T> for neuropil::Result<T> {
    fn or_raise(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
