//! The one model of a user-facing failure: what went wrong, and what to do about it.
//!
//! Libraries keep their own typed errors (thiserror); each says what it means for a user
//! through [`Explain`], and every front door (the CLI, the daemon's API, the Python SDK)
//! shows the same [`Problem`]s. Hints are never pasted into messages.

use std::fmt;

/// A failure as a user sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub message: String,
    /// What would help, if something would; `None` rather than a hint that does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), hint: None }
    }

    pub fn hinted(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self { message: message.into(), hint: Some(hint.into()) }
    }

    /// The same problem, with `context` before its message (e.g. the option or file it is about).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

/// Renders problems the way every Capsule command prints them:
///
/// ```text
/// error: main.py:4:21: unknown `@task` option `rma`
///   hint: did you mean `ram`?
/// ```
pub fn render(problems: &[Problem]) -> String {
    let mut text = String::new();
    for problem in problems {
        text.push_str("error: ");
        text.push_str(&problem.message);
        text.push('\n');
        if let Some(hint) = &problem.hint {
            text.push_str("  hint: ");
            text.push_str(hint);
            text.push('\n');
        }
    }
    text
}

/// An error that can say what it means for the user.
pub trait Explain: std::error::Error {
    /// The problems to show, in order. Most errors are one problem: their message and hint.
    fn problems(&self) -> Vec<Problem> {
        vec![Problem { message: self.to_string(), hint: self.hint() }]
    }

    fn hint(&self) -> Option<String> {
        None
    }
}

impl Explain for Problem {
    fn problems(&self) -> Vec<Problem> {
        vec![self.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_messages_with_their_hints() {
        let text = render(&[Problem::hinted("bad `ram`", "write \"64MB\""), Problem::new("second")]);
        assert_eq!(text, "error: bad `ram`\n  hint: write \"64MB\"\nerror: second\n");
    }
}
