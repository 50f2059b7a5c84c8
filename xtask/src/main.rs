//! Developer commands: `cargo xtask <command>`.
//!
//! # Layout
//! - `dev`: `up`, `migrate`, `token`, `audit`: run the system locally.
//! - `launch`: building the services and running any process in the background: start, wait
//!   until ready, kill, restart, stop. Every command that runs a process does it through here.
//! - `broker`: installing and starting the development Kafka-protocol broker.
//! - `test`: prepare what the tests need (Postgres, a broker) and run them.
//! - `fuzz`: schema-driven HTTP fuzzing of both APIs (schemathesis).
//! - `chaos`: faults under load, and the checks that nothing was lost; writes `RELIABILITY.md`.
//! - `bench`, `pipeline_bench`, `audit_bench`, `transfer_bench`, `scale_bench`, `graphql_bench`,
//!   `reads_bench`: benchmarks that write `BENCHMARKS.md`.
//! - `config_reference`: README.md's configuration table.
//! - `python`: the project's Python tools, in a venv of its own at pinned versions.

#![allow(clippy::print_stdout)]

use clap::{Parser, Subcommand};

mod audit_bench;
mod bench;
mod broker;
mod chaos;
mod config_reference;
mod cpu;
mod dev;
mod fuzz;
mod graphql_bench;
mod launch;
mod pipeline_bench;
mod python;
mod reads_bench;
mod scale_bench;
mod test;
mod transfer_bench;

#[derive(Parser)]
#[command(
    bin_name = "cargo xtask",
    about = "Developer commands of the ledger",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate, start every service, print the URLs and a dev token.
    Up(dev::UpOptions),
    /// Create the database if missing and apply migrations.
    Migrate,
    /// Write README.md's configuration table from the services' SETTINGS.
    ConfigReference,
    /// Mint a development JWT.
    Token(dev::TokenOptions),
    /// Run ledger-audit (built in release) against the `up` database and broker, e.g.
    /// `cargo xtask audit verify --kafka`.
    Audit {
        /// Passed to ledger-audit.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole workspace's tests.
    Test(test::Options),
    /// Fuzz both APIs from their OpenAPI documents with schemathesis.
    Fuzz(fuzz::Options),
    /// Kill -9 and restart each process, freeze the broker and restart Postgres under load;
    /// checks nothing acknowledged is lost or doubled; writes RELIABILITY.md.
    Chaos(chaos::Options),
    /// Benchmarks; each writes its section of BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::Bench),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up(options) => dev::up(&options).await,
        Command::Migrate => dev::migrate().await,
        Command::ConfigReference => config_reference::write(),
        Command::Token(options) => dev::token(&options),
        Command::Audit { args } => dev::audit(&args).await,
        Command::Test(options) => test::run(&options).await,
        Command::Fuzz(options) => fuzz::run(&options).await,
        Command::Chaos(options) => chaos::run(&options).await,
        Command::Bench(bench) => bench::run(&bench).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn passed_through(line: &[&str]) -> Vec<String> {
        match Cli::try_parse_from(line).map(|cli| cli.command) {
            Ok(Command::Test(options)) => options.cargo_test_args(),
            Ok(Command::Audit { args }) => args,
            _ => panic!("{line:?} did not parse"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_and_audit_pass_their_arguments_on_untouched() {
        assert_eq!(
            passed_through(&["xtask", "test", "-p", "domain", "--", "--nocapture"]),
            ["-p", "domain", "--", "--nocapture"]
        );
        assert_eq!(
            passed_through(&["xtask", "test", "--", "--nocapture"]),
            ["--", "--nocapture"]
        );
        assert_eq!(
            passed_through(&["xtask", "test", "-p", "domain"]),
            ["-p", "domain"]
        );
        assert!(passed_through(&["xtask", "test"]).is_empty());
        assert_eq!(
            passed_through(&["xtask", "audit", "verify", "--kafka"]),
            ["verify", "--kafka"]
        );
    }
}
