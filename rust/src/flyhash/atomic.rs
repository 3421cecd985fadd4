//! Replacing a file in one step: write a temporary file beside it, sync it,
//! rename it over the target. A failed save never leaves a half-written file
//! or destroys the old one, and the result is what `open(path, "wb")` would
//! allow: the same refusals, the replaced file's mode kept.

use std::ffi::{OsStr, OsString};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file and a rename.
///
/// Behaves as Python's `neuropil._safetensors.replacing` (the package's other
/// writer), and refuses what `File::create` (`open(path, "wb")`) refuses:
///
/// * a path ending in a separator (`dir/`): `IsADirectory` (or the error
///   about its folder), nothing written;
/// * a symbolic link is followed (the file it points to is replaced, the
///   link stays), a loop of links is the OS's `ELOOP`;
/// * an existing target that is neither a regular file nor a folder
///   (`/dev/null`, a named pipe) is written in place: a rename over it would
///   replace the device or pipe itself (as root, `/dev/null` would become a
///   plain file); a folder is `IsADirectory`;
/// * an existing file this process may not write (mode `0444`...) is
///   `PermissionDenied`, left as it was (a rename would replace it anyway);
/// * a replaced file's mode is kept; a new file gets `0o666` less the umask.
///
/// The temporary file (`.{name}.{pid}-{n}.tmp` beside the target, the name
/// shortened to fit 255 bytes) is created exclusively: a name already taken,
/// say by a killed save of a process with the same pid, is skipped for the
/// next one. It is synced before the rename, the folder after (best effort).
/// Errors name `path`, as given, except a folder that cannot take the
/// temporary file (`PermissionDenied` naming that folder).
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let failed = |e: std::io::Error| Error::file("write", path, e);
    if ends_with_separator(path) {
        return Err(failed(trailing_separator_error(path)));
    }
    // (stat'ed and opened through its links: /dev/stdout's resolve only in
    // the kernel, as /proc/self/fd/1 -> "pipe:[N]")
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(failed);
    }
    let target = resolve_links(path).map_err(failed)?;
    let existing = std::fs::metadata(&target).ok();
    if let Some(m) = &existing {
        if m.is_dir() {
            return Err(failed(custom(ErrorKind::IsADirectory, "Is a directory")));
        }
        if !writable(&target, m) {
            return Err(failed(custom(ErrorKind::PermissionDenied, NOT_WRITABLE)));
        }
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target.file_name().unwrap_or_default();
    let (mut f, tmp) = create_temp(&dir, name, existing.is_some()).map_err(|e| {
        if e.kind() == ErrorKind::PermissionDenied {
            let text = format!(
                "Permission denied: cannot create a temporary file in this folder to save '{}' \
                 (a save writes one beside the file, then renames it over the file)",
                name.to_string_lossy()
            );
            Error::file("write", &dir, custom(ErrorKind::PermissionDenied, text))
        } else {
            failed(e)
        }
    })?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(m) = &existing {
            f.set_permissions(m.permissions())?;
        }
        drop(f);
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(failed(e));
    }
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all(); // the rename itself, best effort
    }
    Ok(())
}

/// Why a save refuses a file it may not write (the rename would bypass its mode).
const NOT_WRITABLE: &str =
    "Permission denied: the file is not writable (write-protected), so a save does not replace it";

/// Symbolic links followed before giving up, as Linux's `open` (`MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Bytes of a file name on the usual file systems (`NAME_MAX`).
const MAX_NAME: usize = 255;

/// Temporary names tried before giving up.
const TEMP_TRIES: usize = 100;

/// The counter of temporary names: one name per try (with the process id),
/// so two threads saving to the same path each write their own file, and the
/// last rename wins whole.
static TEMP_CALLS: AtomicU64 = AtomicU64::new(0);

fn custom(kind: ErrorKind, text: impl Into<String>) -> std::io::Error {
    std::io::Error::new(kind, text.into())
}

/// Whether `path` ends in a path separator (`dir/`), which `Path`'s
/// components drop but `open` does not.
fn ends_with_separator(path: &Path) -> bool {
    let s = path.as_os_str().as_encoded_bytes();
    s.last()
        .is_some_and(|&b| b == b'/' || (cfg!(windows) && b == b'\\'))
}

/// What `open(path, "wb")` says of a path ending in a separator (never a
/// file it could create): the error about its folder, else `IsADirectory`.
fn trailing_separator_error(path: &Path) -> std::io::Error {
    let text = path.as_os_str().to_string_lossy();
    let stripped = text.trim_end_matches(['/', std::path::MAIN_SEPARATOR]);
    if stripped.is_empty() {
        return custom(ErrorKind::IsADirectory, "Is a directory");
    }
    let parent = match Path::new(stripped).parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Err(e) => e,
        Ok(m) if !m.is_dir() => custom(ErrorKind::NotADirectory, "Not a directory"),
        Ok(_) => custom(ErrorKind::IsADirectory, "Is a directory"),
    }
}

/// Where `path` leads through its symbolic links, followed one by one (a
/// dangling link leads to the name it points to, which `open` creates); the
/// OS's error (`ELOOP`) for a loop or a chain of more than [`MAX_LINKS`].
fn resolve_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut cur = path.to_path_buf();
    for _ in 0..=MAX_LINKS {
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&cur)?;
                cur = match cur.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(cur),
        }
    }
    Err(std::fs::metadata(path)
        .err()
        .unwrap_or_else(|| custom(ErrorKind::Other, "Too many levels of symbolic links")))
}

/// Whether this process may write the existing file `path`, as `open` checks
/// it (effective ids, capabilities such as root's `CAP_DAC_OVERRIDE`).
#[cfg(target_os = "linux")]
fn writable(path: &Path, _meta: &std::fs::Metadata) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true; // (a NUL in the name: the create below reports it)
    };
    // SAFETY: `c` is a NUL-terminated string alive for the call, which only reads it.
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) };
    rc == 0
        || !matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EACCES | libc::EPERM | libc::EROFS)
        )
}

/// Whether this process may write the existing file `path` (its mode's write
/// bits, or Windows' read-only attribute).
#[cfg(not(target_os = "linux"))]
fn writable(_path: &Path, meta: &std::fs::Metadata) -> bool {
    !meta.permissions().readonly()
}

/// `.{name}.{tag}.tmp`, `name` shortened (whole characters) so the whole fits
/// [`MAX_NAME`] bytes: a name `open` takes never fails for its temporary one.
fn temp_name(name: &OsStr, tag: &str) -> OsString {
    let tail = format!(".{tag}.tmp");
    let room = MAX_NAME.saturating_sub(1 + tail.len());
    let mut out = OsString::from(".");
    match name.to_str() {
        Some(s) => {
            let mut n = s.len().min(room);
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            out.push(&s[..n]);
        }
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::ffi::OsStrExt;
                let b = name.as_bytes();
                out.push(OsStr::from_bytes(&b[..b.len().min(room)]));
            }
            #[cfg(not(unix))]
            {
                let s = name.to_string_lossy();
                let mut n = s.len().min(room);
                while !s.is_char_boundary(n) {
                    n -= 1;
                }
                out.push(&s[..n]);
            }
        }
    }
    out.push(tail);
    out
}

/// A new temporary file in `dir` for `name`, created exclusively (`O_EXCL`),
/// private (`0o600`) when it will replace a file (it takes that file's mode
/// before the rename), else with `open`'s mode (`0o666` less the umask).
fn create_temp(
    dir: &Path,
    name: &OsStr,
    replacing: bool,
) -> std::io::Result<(std::fs::File, PathBuf)> {
    let mut last = None;
    for _ in 0..TEMP_TRIES {
        let call = TEMP_CALLS.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(temp_name(name, &format!("{}-{call}", std::process::id())));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(if replacing { 0o600 } else { 0o666 });
        }
        #[cfg(not(unix))]
        let _ = replacing;
        match opts.open(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            // (a leftover of a killed save, or another process's file: not
            // this call's to remove; the next name)
            Err(e) if e.kind() == ErrorKind::AlreadyExists => last = Some(tmp),
            Err(e) => return Err(e),
        }
    }
    Err(custom(
        ErrorKind::AlreadyExists,
        format!(
            "no free temporary file name after {TEMP_TRIES} tries (the last: {})",
            last.unwrap_or_default().display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("neuropil-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn io_error(r: Result<()>) -> std::io::Error {
        match r {
            Err(Error::File { source, .. }) => source,
            other => panic!("expected a file error; got {other:?}"),
        }
    }

    #[test]
    fn temporary_names_fit_255_bytes_and_keep_whole_characters() {
        for len in [2, 200, 240, 242, 250, 255] {
            let name = "é".repeat(len / 2) + &"n".repeat(len % 2);
            let t = temp_name(OsStr::new(&name), "123456-7");
            let t = t.to_str().unwrap();
            assert!(t.len() <= MAX_NAME, "{len}: {}", t.len());
            assert!(t.starts_with(".é") && t.ends_with(".123456-7.tmp"), "{t}");
            if len < 200 {
                assert_eq!(t, format!(".{name}.123456-7.tmp"));
            }
        }
    }

    #[test]
    fn a_leftover_temporary_file_is_skipped_and_kept() {
        let dir = scratch("stale");
        let path = dir.join("ix.st");
        // The names the next saves of this process would take (another test
        // may take some first: the save must succeed either way).
        let next = TEMP_CALLS.load(Ordering::Relaxed);
        let stale: Vec<PathBuf> = (next..next + 3)
            .map(|n| dir.join(format!(".ix.st.{}-{n}.tmp", std::process::id())))
            .collect();
        for p in &stale {
            std::fs::write(p, b"partial").unwrap();
        }
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        for p in &stale {
            assert_eq!(std::fs::read(p).unwrap(), b"partial");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn refuses_what_open_refuses_and_keeps_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("refuse");
        // A path ending in a separator: never a file, whatever exists.
        let slash = dir.join("newdir/");
        assert!(slash.as_os_str().to_string_lossy().ends_with('/'));
        let e = io_error(write_atomic(&slash, b"x"));
        assert_eq!(e.kind(), ErrorKind::IsADirectory, "{e}");
        let e = io_error(write_atomic(&dir.join("missing/newdir/"), b"x"));
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        // A folder.
        let e = io_error(write_atomic(&dir, b"x"));
        assert_eq!(e.kind(), ErrorKind::IsADirectory, "{e}");
        // A loop of links: the OS's ELOOP, and the links stay.
        std::os::unix::fs::symlink("b", dir.join("a")).unwrap();
        std::os::unix::fs::symlink("a", dir.join("b")).unwrap();
        let e = io_error(write_atomic(&dir.join("a"), b"x"));
        assert!(e.raw_os_error().is_some(), "{e}");
        assert!(dir.join("a").is_symlink() && dir.join("b").is_symlink());
        // Modes: a replaced file keeps its own.
        let path = dir.join("ix.st");
        write_atomic(&path, b"x").unwrap();
        for mode in [0o600, 0o640, 0o664] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            write_atomic(&path, b"x").unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, mode, "{mode:o}");
        }
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
