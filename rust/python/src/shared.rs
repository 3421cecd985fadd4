//! State that Python threads share: the mutable native objects.
//!
//! A `#[pyclass]` method taking `&mut self` holds pyo3's borrow for the whole
//! call; when it releases the GIL (a long add or record), a call from another
//! thread finds the object borrowed and fails with "Already borrowed". So the
//! mutable classes are `frozen` and keep their state behind a read-write lock
//! instead: concurrent calls wait for each other (readers together, a writer
//! alone), as calls to one numpy array or torch module would.
//!
//! No thread ever waits for a lock while it holds the GIL, so a long write in
//! one thread neither deadlocks with nor stalls the others: [`Shared::read`]
//! and [`Shared::write`] take the lock inside `py.detach`; [`Shared::peek`]
//! and [`Shared::poke`] (short steps with the GIL held) try it, and when it is
//! taken wait for it with the GIL released, then try again.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use pyo3::prelude::*;

pub struct Shared<T>(RwLock<T>);

impl<T: Send + Sync> Shared<T> {
    pub fn new(value: T) -> Self {
        Shared(RwLock::new(value))
    }

    /// `f(state)` with the GIL released, alongside other readers.
    pub fn read<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&T) -> R + Send) -> R {
        py.detach(|| f(&self.0.read().unwrap_or_else(PoisonError::into_inner)))
    }

    /// `f(&mut state)` with the GIL released, alone.
    pub fn write<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut T) -> R + Send) -> R {
        py.detach(|| f(&mut self.0.write().unwrap_or_else(PoisonError::into_inner)))
    }

    /// The state for a short read with the GIL held. The core reports errors
    /// as values, so a poisoned lock (a panic while writing, a bug) still
    /// holds the last state it reached; it is served rather than turned into
    /// a second panic.
    pub fn peek(&self) -> RwLockReadGuard<'_, T> {
        loop {
            match self.0.try_read() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                // Wait for the writer without the GIL, then try again.
                Err(TryLockError::WouldBlock) => unheld(|| drop(self.0.read())),
            }
        }
    }

    /// The state for a short write with the GIL held (as [`Self::peek`]).
    pub fn poke(&self) -> RwLockWriteGuard<'_, T> {
        loop {
            match self.0.try_write() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => unheld(|| drop(self.0.write())),
            }
        }
    }
}

/// Runs `f` with the GIL released (the getters that call [`Shared::peek`]
/// hold it without a `Python` token at hand; attaching is a counter bump).
fn unheld(f: impl FnOnce() + Send) {
    Python::attach(|py| py.detach(f));
}
