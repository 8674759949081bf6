//! How a command ends: its exit code, from the failure's category (`manifest_schema::Category`,
//! the one table every front door derives from), and its problems, rendered once.

use std::process::ExitCode;

use manifest_schema::problem::{FrontDoor, render};
use manifest_schema::{Category, Explain, Problem};

/// A command that ended well, or whose task ran and failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what was asked.
    Success,
    /// The task ran and failed (after its retries), or was stopped.
    TaskFailed,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        match exit {
            Exit::Success => ExitCode::SUCCESS,
            Exit::TaskFailed => ExitCode::from(Category::Task.exit_code()),
        }
    }
}

/// A command that failed before or around its task: what kind of failure, and what to show.
#[derive(Debug)]
pub struct Failure {
    pub category: Category,
    pub problems: Vec<Problem>,
}

impl Failure {
    /// `error` as the command ends with it.
    pub fn of(error: &dyn Explain) -> Self {
        Self { category: error.category(), problems: error.problems() }
    }

    pub fn problem(category: Category, problem: Problem) -> Self {
        Self { category, problems: vec![problem] }
    }

    /// Prints the problems on stderr, as `format` says, and gives the exit code.
    pub fn report(&self, format: MessageFormat) -> ExitCode {
        match format {
            MessageFormat::Human => eprint!("{}", render(&self.problems)),
            MessageFormat::Json => eprintln!("{}", self.json()),
        }
        ExitCode::from(self.category.exit_code())
    }

    /// The failure as one line of JSON, in the shape of the daemon's API errors (`{"error":
    /// {"kind", "message", "hint", "problems"}}`), hints spelled for the command line.
    fn json(&self) -> String {
        let problems: Vec<Problem> = self.problems.iter().cloned().map(|p| p.spelled(FrontDoor::Cli)).collect();
        let first = problems.first().cloned().unwrap_or_else(|| Problem::new("failed"));
        let error = serde_json::json!({
            "kind": self.category,
            "message": first.message,
            "hint": first.hint,
            "problems": problems,
        });
        serde_json::json!({ "error": error }).to_string()
    }
}

/// How a command prints its failure: for people, or for programs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageFormat {
    /// `error: ...` and `  hint: ...` lines.
    #[default]
    Human,
    /// One line of JSON on stderr: `{"error": {"kind", "message", "hint", "problems"}}`.
    Json,
}

/// Any library error ends a command as what it explains itself to be.
impl<E: Explain> From<E> for Failure {
    fn from(error: E) -> Self {
        Self::of(&error)
    }
}
