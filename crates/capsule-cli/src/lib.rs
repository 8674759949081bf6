//! The `capsule` and `capsule-exec` commands. Each command is a thin client of the engine
//! API of `capsule-exec` (and of `capsule-build` with the `build` feature); what they share
//! is here: exit codes and error rendering (`exit`), the project's layout (`layout`), the
//! options of a run (`run_args`) and what a run shows on the terminal (`terminal`).

mod cluster_args;
mod commands;
mod exit;
mod launch;
mod layout;
mod remote;
mod run_args;
mod sandbox_args;
mod terminal;

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::exit::{Failure, MessageFormat};

/// Run Python `@task` functions in WebAssembly sandboxes.
#[derive(Parser)]
#[command(
    name = "capsule",
    version,
    after_help = "Examples:\n  capsule run hello.py Ada          build (cached) and run the task `main`\n  capsule build main.py             build only; writes .capsule/build/main/manifest.toml\n  capsule keygen release.key        a key pair to sign builds (`build --sign`) for runners (`--trust`)\n  capsule runs                      list this project's runs\n  capsule resume RUN_ID             resume a failed or interrupted run\n  capsule daemon --detach           keep an engine warm; `run` then goes through it\n  capsule list                      running runs as trees (`--all` for finished ones)\n  capsule python -c '1 + 1'         run a code string in a sandbox\n  capsule mcp tasks.py              an MCP server: `run_python`, sessions, and every task as a tool\n  capsule worker --nats URL         run tasks from a cluster's queue (with `capsule daemon --nats URL`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How a failure is printed on stderr: `human` lines, or one line of `json` for programs.
    #[arg(long, global = true, value_enum, default_value_t)]
    message_format: MessageFormat,
}

#[derive(Subcommand)]
enum Command {
    #[cfg(feature = "build")]
    Build(commands::build::BuildCommand),
    Keygen(commands::keygen::KeygenCommand),
    Run(commands::run::RunCommand),
    #[cfg(feature = "build")]
    Python(commands::python::PythonCommand),
    #[cfg(feature = "build")]
    Mcp(commands::mcp::McpCommand),
    Resume(commands::resume::ResumeCommand),
    Runs(commands::runs::RunsCommand),
    Daemon(commands::daemon::DaemonCommand),
    List(commands::list::ListCommand),
    Stop(commands::stop::StopCommand),
    Restart(commands::restart::RestartCommand),
    Logs(commands::logs::LogsCommand),
    Worker(commands::worker::WorkerCommand),
}

/// The command-line reference of the book (`docs/src/reference/cli.md`): every command's own
/// `--help`, so that the reference says what the commands say.
pub fn cli_reference() -> String {
    use clap::CommandFactory;
    let mut text = String::from(
        "# Command-line reference\n\nEvery command's `--help`, as the commands print it (this page is generated from them by\n`cargo xtask docs`, and a test fails when it is out of date).\n",
    );
    let mut capsule = Cli::command().term_width(100);
    let mut section = |name: &str, command: &mut clap::Command| {
        text.push_str(&format!(
            "\n## `{name}`\n\n```text\n{}\n```\n",
            command.render_long_help().to_string().trim_end()
        ));
    };
    section("capsule", &mut capsule.clone());
    let names: Vec<String> = capsule.get_subcommands().map(|c| c.get_name().to_string()).collect();
    for name in names {
        let command = capsule.find_subcommand_mut(&name).expect("listed above");
        section(&format!("capsule {name}"), &mut command.clone().bin_name(format!("capsule {name}")));
    }
    section("capsule-exec", &mut commands::exec::ExecCommand::command().term_width(100));
    text
}

/// `capsule`'s `main`.
pub fn capsule_main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let format = cli.message_format;
    match cli.command {
        // The daemon sets up its own runtimes.
        Command::Daemon(command) => command.execute().unwrap_or_else(|failure| failure.report(format)),
        command => block_on(format, async move {
            match command {
                #[cfg(feature = "build")]
                Command::Build(command) => command.execute().await,
                Command::Keygen(command) => command.execute().await,
                Command::Run(command) => command.execute().await,
                #[cfg(feature = "build")]
                Command::Python(command) => command.execute().await,
                #[cfg(feature = "build")]
                Command::Mcp(command) => command.execute().await,
                Command::Resume(command) => command.execute().await,
                Command::Runs(command) => command.execute().await,
                Command::List(command) => command.execute().await,
                Command::Stop(command) => command.execute().await,
                Command::Restart(command) => command.execute().await,
                Command::Logs(command) => command.execute().await,
                Command::Worker(command) => command.execute().await,
                Command::Daemon(_) => unreachable!("handled above"),
            }
        }),
    }
}

/// `capsule-exec`'s `main`.
pub fn capsule_exec_main() -> ExitCode {
    let command = commands::exec::ExecCommand::parse();
    init_logging();
    block_on(command.message_format(), command.execute())
}

/// Capsule's own diagnostics on stderr: warnings, or what `CAPSULE_LOG` asks for.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing::level_filters::LevelFilter::WARN.into())
        .with_env_var("CAPSULE_LOG")
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// What every command shares: the async runtime, and the one place where failures are shown.
fn block_on(format: MessageFormat, command: impl Future<Output = Result<ExitCode, Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(manifest_schema::Category::Internal.exit_code());
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(failure) => failure.report(format),
    }
}

#[cfg(test)]
mod tests {
    /// The book's command-line reference says what the commands say; `CAPSULE_UPDATE_DOCS=1`
    /// (as `cargo xtask docs` sets) writes it anew.
    #[test]
    fn the_books_cli_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/src/reference/cli.md");
        let reference = super::cli_reference();
        if std::env::var_os("CAPSULE_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &reference).unwrap();
        }
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(written == reference, "{} is out of date: run `cargo xtask docs`", path.display());
    }
}
