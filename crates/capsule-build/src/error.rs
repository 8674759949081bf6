//! Build failures, each with what went wrong and, where useful, a hint.

use std::fmt;

use thiserror::Error;

use crate::discover::Diagnostics;

#[derive(Debug, Error)]
pub enum BuildError {
    /// Problems in the Python source, with file:line:column.
    #[error("{0}")]
    Discovery(#[from] Diagnostics),
    /// Anything else, with an optional hint.
    #[error("{0}")]
    Other(Message),
}

#[derive(Debug)]
pub struct Message {
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl BuildError {
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Other(Message { message: message.into(), hint: Some(hint.into()) })
    }

    pub fn message(message: impl Into<String>) -> Self {
        Self::Other(Message { message: message.into(), hint: None })
    }

    pub fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        Self::message(format!("{}: {error}", what.into()))
    }

    /// The lines to print, each to be prefixed with `error: `.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Discovery(diagnostics) => diagnostics.0.iter().map(ToString::to_string).collect(),
            Self::Other(message) => vec![message.to_string()],
        }
    }
}
