//! Build failures, each with what went wrong and, where useful, a hint.

use manifest_schema::{Explain, Problem};
use thiserror::Error;

use crate::discover::Diagnostics;

#[derive(Debug, Error)]
pub enum BuildError {
    /// Problems in the Python source, with file:line:column.
    #[error("{0}")]
    Discovery(#[from] Diagnostics),
    /// Anything else.
    #[error("{0}")]
    Other(Problem),
}

impl BuildError {
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Other(Problem::hinted(message, hint))
    }

    pub fn message(message: impl Into<String>) -> Self {
        Self::Other(Problem::new(message))
    }

    pub fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        Self::message(format!("{}: {error}", what.into()))
    }
}

impl Explain for BuildError {
    fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Discovery(diagnostics) => diagnostics.problems(),
            Self::Other(problem) => vec![problem.clone()],
        }
    }
}

impl From<Problem> for BuildError {
    fn from(problem: Problem) -> Self {
        Self::Other(problem)
    }
}
