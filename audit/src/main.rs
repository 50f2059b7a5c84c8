//! `ledger-audit`: what an auditor runs against the event store. It only reads.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use audit::export::{self, Format, Selection};
use audit::verify::{self, Scope, VerifyReport};
use audit::{ACCOUNT, TRANSFER, kafka_check, replay};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use service_kit::db::{self, DatabaseConfig};
use service_kit::kafka::KafkaConfig;
use tracing_subscriber::EnvFilter;

/// Verify, export and replay the ledger's event history. Reads `DATABASE_URL` (and
/// `KAFKA_BROKERS`, `KAFKA_TOPIC_PREFIX` for `verify --kafka`).
#[derive(Parser)]
#[command(name = "ledger-audit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recompute the hash chains: of one account, a tenant, everything, or an export file.
    /// Exits with status 1 if anything is broken.
    Verify {
        /// One account's stream.
        #[arg(long, conflicts_with_all = ["tenant", "file"])]
        account: Option<String>,
        /// Every stream of this tenant.
        #[arg(long, conflicts_with = "file")]
        tenant: Option<String>,
        /// An export written by `ledger-audit export`, verified offline (no database).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The export's format (default: from the file's extension, `.csv` or JSON Lines).
        #[arg(long, value_enum, requires = "file")]
        format: Option<FileFormat>,
        /// Also compare the hashes carried on the Kafka topics (accounts and transfers) with the
        /// store; with --account or --tenant, only their messages.
        #[arg(long, conflicts_with = "file")]
        kafka: bool,
        /// With --kafka and neither filter: compare about this many messages of each topic,
        /// spread over it, not all.
        #[arg(long, requires = "kafka")]
        sample: Option<u64>,
    },
    /// Write events with every hashed field, so the export can be verified offline.
    Export {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// Recorded at or after this RFC 3339 instant.
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        /// Recorded before this RFC 3339 instant.
        #[arg(long)]
        to: Option<DateTime<Utc>>,
        /// Default: from the output file's extension, else JSON Lines.
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Default: standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Print every account's balance as of an instant, replayed from the event store.
    Replay {
        /// An RFC 3339 instant, e.g. 2026-11-01T00:00:00Z.
        #[arg(long)]
        until: DateTime<Utc>,
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum FileFormat {
    Jsonl,
    Csv,
}

impl From<FileFormat> for Format {
    fn from(format: FileFormat) -> Self {
        match format {
            FileFormat::Jsonl => Self::JsonLines,
            FileFormat::Csv => Self::Csv,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let intact = match cli.command {
        Command::Verify {
            file: Some(file),
            format,
            ..
        } => {
            let format = format.map_or_else(|| Format::from_path(&file), Format::from);
            let input = std::io::BufReader::new(
                std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?,
            );
            let report = verify::verify_events(export::read(format, input))?;
            print_verify(&mut out, &report)?;
            report.intact()
        }
        Command::Verify {
            account,
            tenant,
            kafka,
            sample,
            ..
        } => {
            let pool = connect().await?;
            let scope = match (account, tenant) {
                (Some(id), _) => Scope::Stream {
                    aggregate_type: ACCOUNT.into(),
                    aggregate_id: id,
                },
                (None, Some(tenant)) => Scope::Tenant(tenant),
                (None, None) => Scope::All,
            };
            let report = verify::verify_store(&pool, &scope, true).await?;
            print_verify(&mut out, &report)?;
            let mut intact = report.intact();
            if kafka {
                let config = KafkaConfig::from_env()?;
                for aggregate_type in [ACCOUNT, TRANSFER] {
                    if let Scope::Stream {
                        aggregate_type: only,
                        ..
                    } = &scope
                        && only != aggregate_type
                    {
                        continue;
                    }
                    let report =
                        kafka_check::check_topic(&pool, &config, aggregate_type, &scope, sample)
                            .await?;
                    writeln!(out, "\nkafka topic: {}", report.topic)?;
                    writeln!(out, "messages on the topic: {}", report.messages)?;
                    writeln!(out, "messages compared: {}", report.compared)?;
                    writeln!(out, "hash mismatches: {}", report.mismatches.len())?;
                    writeln!(out, "unreadable messages: {}", report.unreadable)?;
                    writeln!(out, "time taken: {}", seconds(report.elapsed))?;
                    for mismatch in &report.mismatches {
                        writeln!(
                            out,
                            "  {aggregate_type}/{} version {} (partition {}, offset {}): published {}, stored {}",
                            mismatch.aggregate_id,
                            mismatch.version,
                            mismatch.partition,
                            mismatch.offset,
                            mismatch.published_hash,
                            mismatch
                                .stored_hash
                                .as_deref()
                                .unwrap_or("nothing (event missing)"),
                        )?;
                    }
                    intact &= report.intact();
                }
            }
            intact
        }
        Command::Export {
            account,
            tenant,
            from,
            to,
            format,
            output,
        } => {
            let pool = connect().await?;
            let format = match (format, &output) {
                (Some(format), _) => format.into(),
                (None, Some(path)) => Format::from_path(path),
                (None, None) => Format::JsonLines,
            };
            let selection = Selection {
                aggregate_type: account.is_some().then(|| ACCOUNT.to_owned()),
                aggregate_id: account,
                tenant,
                from,
                to,
            };
            let report = match &output {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    export::export(&pool, &selection, format, file, true).await?
                }
                None => export::export(&pool, &selection, format, &mut out, false).await?,
            };
            tracing::info!(
                events = report.events,
                seconds = report.elapsed.as_secs_f64(),
                "exported"
            );
            true
        }
        Command::Replay { until, tenant } => {
            let pool = connect().await?;
            let report = replay::replay(&pool, until, tenant.as_deref(), true).await?;
            writeln!(
                out,
                "{:<36}  {:<16}  {:<24}  {:<3}  {:>20}  {:<6}  {:>7}",
                "account", "tenant", "owner", "cur", "balance", "status", "version"
            )?;
            for replayed in &report.accounts {
                let Some(account) = replayed.account.state() else {
                    continue;
                };
                writeln!(
                    out,
                    "{:<36}  {:<16}  {:<24}  {:<3}  {:>20}  {:<6}  {:>7}",
                    replayed.account_id,
                    account.tenant,
                    account.owner.as_str(),
                    account.currency.to_string(),
                    account.balance,
                    account.status.as_str(),
                    replayed.version,
                )?;
            }
            writeln!(
                out,
                "\naccounts: {}, events folded: {}, time taken: {}",
                report.accounts.len(),
                report.events,
                seconds(report.elapsed)
            )?;
            true
        }
    };
    out.flush()?;
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The event store, read-only: no migrations, and no statement timeout, since one scan may
/// cover the whole history.
async fn connect() -> anyhow::Result<sqlx::PgPool> {
    let mut config = DatabaseConfig::from_env()?;
    config.statement_timeout = Duration::ZERO;
    config.max_connections = 2;
    Ok(db::connect(&config).await?)
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.2} s", elapsed.as_secs_f64())
}

fn print_verify(out: &mut impl Write, report: &VerifyReport) -> std::io::Result<()> {
    let rate = report.events as f64 / report.elapsed.as_secs_f64().max(1e-9);
    writeln!(out, "streams checked: {}", report.streams)?;
    writeln!(out, "events checked: {}", report.events)?;
    if report.anchored_streams > 0 {
        writeln!(
            out,
            "streams starting after version 1 (checked from their first prev_hash): {}",
            report.anchored_streams
        )?;
    }
    writeln!(out, "breaks found: {}", report.breaks.len())?;
    writeln!(
        out,
        "time taken: {} ({rate:.0} events/s)",
        seconds(report.elapsed)
    )?;
    for found in &report.breaks {
        writeln!(
            out,
            "  {}/{} version {}: {} ({})",
            found.aggregate_type,
            found.aggregate_id,
            found.version,
            found.reason,
            found.explanation
        )?;
    }
    writeln!(
        out,
        "result: {}",
        if report.intact() { "INTACT" } else { "BROKEN" }
    )
}
