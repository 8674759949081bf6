//! Build failures, each with what went wrong and, where useful, a hint.

use manifest_schema::{Category, Explain, Problem};
use thiserror::Error;

use crate::discover::Diagnostics;

#[derive(Debug, Error)]
pub enum BuildError {
    /// Problems in the Python source, with file:line:column.
    #[error("{0}")]
    Discovery(#[from] Diagnostics),
    /// What the caller must provide is not there: the runtime to build with, a file to build.
    #[error("{0}")]
    Usage(Problem),
    /// Anything else that stopped the build.
    #[error("{0}")]
    Other(Problem),
}

impl BuildError {
    /// The build failed, and `hint` says what would help.
    pub fn hinted(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Other(Problem::hinted(message, hint))
    }

    /// The caller did not give what a build needs (`hint`: how to give it).
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Usage(Problem::hinted(message, hint))
    }

    pub fn message(message: impl Into<String>) -> Self {
        Self::Other(Problem::new(message))
    }

    pub fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        Self::message(format!("{}: {error}", what.into()))
    }
}

impl Explain for BuildError {
    fn category(&self) -> Category {
        match self {
            Self::Usage(_) => Category::Usage,
            Self::Discovery(_) | Self::Other(_) => Category::Build,
        }
    }

    fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Discovery(diagnostics) => diagnostics.problems(),
            Self::Usage(problem) | Self::Other(problem) => vec![problem.clone()],
        }
    }
}

impl From<Problem> for BuildError {
    fn from(problem: Problem) -> Self {
        Self::Other(problem)
    }
}
