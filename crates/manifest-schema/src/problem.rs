//! The one model of a user-facing failure: what kind of failure it is, what went wrong, and
//! what to do about it.
//!
//! Libraries keep their own typed errors (thiserror); each says what it means for a user
//! through [`Explain`]: its [`Category`], from which every front door derives what it shows
//! (the CLI's exit code, the API's error kind and HTTP status, the Python SDK's exception),
//! and its [`Problem`]s, which every front door shows alike. Hints are never pasted into
//! messages.

use std::fmt;

/// What kind of failure: the one classification every front door derives from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// What was asked is not valid: arguments, options, a file or an id. (The daemon's API
    /// called it `bad_request` before 0.2; that name is still read.)
    #[serde(alias = "bad_request")]
    Usage,
    /// What was named does not exist (a run, a session, a route).
    NotFound,
    /// What was named is not in a state that allows it (stopping a finished run).
    Conflict,
    /// What was sent is larger than is accepted.
    TooLarge,
    /// The caller did not prove who it is.
    Unauthorized,
    /// The project could not be built.
    Build,
    /// A manifest or its artifact cannot be loaded: missing, for another engine, or a hash
    /// or signature that does not match.
    Load,
    /// The task ran and failed, or was stopped.
    Task,
    /// Too much is going on, or the service is stopping: try again later.
    Busy,
    /// Capsule itself failed, or the machine refused something (disk, threads).
    Internal,
}

impl Category {
    /// The process exit code a command ends with.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Task => 1,
            Self::Usage | Self::NotFound | Self::Conflict | Self::TooLarge => 2,
            Self::Build => 3,
            Self::Load => 4,
            Self::Unauthorized | Self::Busy | Self::Internal => 70,
        }
    }

    /// The HTTP status the daemon's API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Usage => 400,
            Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::TooLarge => 413,
            Self::Build | Self::Load | Self::Task => 422,
            Self::Busy => 503,
            Self::Internal => 500,
        }
    }
}

/// A failure as a user sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    pub message: String,
    /// What would help, if something would; `None` rather than a hint that does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// What a caller can give, named in hints as `<<name>>`: each front door spells it its own
/// way (the CLI as a flag, the API and the SDK as a field or argument), so that a library's
/// hint never names a flag its caller does not have.
const PARAMETERS: &[(&str, &str, &str)] = &[
    ("task", "`--task NAME`", "`task`"),
    ("journal", "`--journal PATH`", "`journal`"),
    ("trust", "`--trust KEY.pub`", "`trust`"),
    ("in_process", "run without `--daemon`", "run in this process (no `capsule.connect`)"),
];

/// Who shows a problem, and so how its hint names what the caller can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontDoor {
    /// The `capsule` and `capsule-exec` commands: flags.
    Cli,
    /// The daemon's API, and the SDK and MCP server on it: fields and arguments.
    Api,
}

impl Problem {
    /// The problem with its hint's parameters spelled for `door`.
    pub fn spelled(mut self, door: FrontDoor) -> Self {
        if let Some(hint) = &mut self.hint {
            for (name, cli, api) in PARAMETERS {
                let spelling = match door {
                    FrontDoor::Cli => cli,
                    FrontDoor::Api => api,
                };
                *hint = hint.replace(&format!("<<{name}>>"), spelling);
            }
        }
        self
    }
}

/// Renders problems the way every Capsule command prints them:
///
/// ```text
/// error: main.py:4:21: unknown `@task` option `rma`
///   hint: did you mean `ram`?
/// ```
pub fn render(problems: &[Problem]) -> String {
    let mut text = String::new();
    for problem in problems.iter().cloned().map(|p| p.spelled(FrontDoor::Cli)) {
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
    /// What kind of failure it is.
    fn category(&self) -> Category;

    /// The problems to show, in order. Most errors are one problem: their message and hint.
    fn problems(&self) -> Vec<Problem> {
        vec![Problem { message: self.to_string(), hint: self.hint() }]
    }

    fn hint(&self) -> Option<String> {
        None
    }
}

/// A problem on its own is a usage problem: what was asked is not valid.
impl Explain for Problem {
    fn category(&self) -> Category {
        Category::Usage
    }

    fn problems(&self) -> Vec<Problem> {
        vec![self.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_what_the_caller_can_give_as_its_front_door_spells_it() {
        let problem = Problem::hinted("several tasks", "choose one with <<task>>: `a`, `b`");
        assert_eq!(problem.clone().spelled(FrontDoor::Cli).hint.unwrap(), "choose one with `--task NAME`: `a`, `b`");
        assert_eq!(problem.clone().spelled(FrontDoor::Api).hint.unwrap(), "choose one with `task`: `a`, `b`");
        assert!(render(&[problem]).contains("hint: choose one with `--task NAME`"));
    }

    #[test]
    fn renders_messages_with_their_hints() {
        let text = render(&[Problem::hinted("bad `ram`", "write \"64MB\""), Problem::new("second")]);
        assert_eq!(text, "error: bad `ram`\n  hint: write \"64MB\"\nerror: second\n");
    }
}
