//! Developer commands: `cargo xtask <command>`.
//!
//! # Layout
//! - `dev`: `up`, `migrate`, `token`: run the system locally.
//! - `test`: prepare what the tests need (Postgres, a broker) and run them.
//! - `fuzz`: schema-driven HTTP fuzzing of both APIs (schemathesis).
//! - `broker`: installing and starting the development Kafka-protocol broker.
//! - `bench`, `pipeline_bench`, `audit_bench`, `transfer_bench`: benchmarks that write
//!   `BENCHMARKS.md`.

#![allow(clippy::print_stdout)]

use anyhow::Context;

mod args;
mod audit_bench;
mod bench;
mod broker;
mod chaos;
mod config_reference;
mod dev;
mod fuzz;
mod pipeline_bench;
mod test;
mod transfer_bench;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  up                     migrate, start every service, print URLs and a dev token
  migrate                create the database if missing and apply migrations
  config-reference       write README.md's configuration table from the services' SETTINGS
  token --tenant T --role R [--role R2] [--sub S] [--ttl SECONDS]
                         mint a development JWT
  audit ARGS             ledger-audit (built in release) against the `up` database and broker,
                         e.g. `cargo xtask audit verify --kafka`
  test [ARGS]            run the whole workspace's tests (ARGS go to cargo test)
  fuzz [--examples N]    schemathesis against both APIs' OpenAPI documents
  chaos [--seconds S] [--clients C] [--restart-postgres yes|no]
                         kill -9 and restart each process, the broker and Postgres under load;
                         checks nothing acknowledged is lost or doubled; writes RELIABILITY.md
  bench commands         command throughput/latency vs pgbench; writes BENCHMARKS.md
  bench pipeline [--events N] [--rate R] [--seconds S]
                         relay, projector, rebuild throughput and end-to-end latency
  bench audit [--events N]
                         verify, replay, export, check throughput; audit query latency
  bench transfers [--seconds S] [--clients C] [--rate R]
                         transfers end to end through the process manager, beside deposits
";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    match command.as_deref() {
        Some("up") => dev::up().await,
        Some("migrate") => dev::migrate().await,
        Some("config-reference") => config_reference::write(),
        Some("token") => dev::token(&rest),
        Some("audit") => dev::audit(&rest).await,
        Some("test") => test::run(&rest).await,
        Some("bench") => bench::run(&rest).await,
        Some("fuzz") => fuzz::run(&rest).await,
        Some("chaos") => chaos::run(&rest).await,
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")).context("cargo xtask")
        }
    }
}
