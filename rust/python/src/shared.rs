//! State that Python threads share: the mutable native objects.
//!
//! A `#[pyclass]` method taking `&mut self` holds pyo3's borrow for the whole
//! call; when it releases the GIL (a long add or record), a call from another
//! thread finds the object borrowed and fails with "Already borrowed". So the
//! mutable classes are `frozen` and keep their state behind a read-write lock
//! instead: concurrent calls wait for each other (readers together, a writer
//! alone), as calls to one numpy array or torch module would.
//!
//! No deadlock with the GIL: a guard is either taken and dropped inside
//! `py.detach` ([`Shared::read`], [`Shared::write`]), or taken with the GIL
//! held for a short step that never releases it ([`Shared::peek`],
//! [`Shared::poke`]). A thread holding a guard therefore never waits for the
//! GIL, and the thread holding the GIL can always get its guard.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pyo3::prelude::*;

pub struct Shared<T>(RwLock<T>);

impl<T: Send + Sync> Shared<T> {
    pub fn new(value: T) -> Self {
        Shared(RwLock::new(value))
    }

    /// `f(state)` with the GIL released, alongside other readers.
    pub fn read<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&T) -> R + Send) -> R {
        py.detach(|| f(&self.peek()))
    }

    /// `f(&mut state)` with the GIL released, alone.
    pub fn write<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut T) -> R + Send) -> R {
        py.detach(|| f(&mut self.poke()))
    }

    /// The state for a short read with the GIL held (drop it before any
    /// `py.detach`). The core reports errors as values, so a poisoned lock
    /// (a panic while writing, a bug) still holds the last state it reached;
    /// it is served rather than turned into a second panic.
    pub fn peek(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state for a short write with the GIL held (as [`Self::peek`]).
    pub fn poke(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}
