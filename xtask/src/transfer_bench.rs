//! `cargo xtask bench transfers`: transfers end to end (request → completed, rejected or
//! refunded) through the real processes: the command API with its relay, the process manager
//! and the projector as release builds, a broker, Postgres. Beside them, in the same run,
//! deposits through the same command API: a transfer is two account steps and three transfer
//! appends driven through Kafka, a deposit one append. Writes its section of `BENCHMARKS.md`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::json;
use service_kit::db::{self, DatabaseConfig};
use sqlx::PgPool;
use uuid::Uuid;

use crate::bench::{SECRET, machine, percentile_ms, reset_database, service_token, write_section};
use crate::broker;
use crate::launch::{self, Launch, Profile, Service, free_address};
use crate::pipeline_bench::Sightings;

const ACCOUNTS: usize = 100;
const INITIAL_BALANCE: i64 = 1_000_000_000;

/// `cargo xtask bench transfers`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Length of each run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Closed-loop clients of the deposit and saturating transfer runs.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Transfers per second of the steady run; by default 80% of what the saturating run
    /// completed per second.
    #[arg(long)]
    rate: Option<u64>,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let Options {
        seconds,
        clients,
        rate,
    } = *options;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ledger_bench_transfers".into());
    let database = DatabaseConfig::with_url(&url);
    reset_database(&database).await?;
    let pool = db::connect(&database).await?;
    let broker = broker::start(broker::Storage::Memory).await?;

    launch::build(Profile::Release, &["command-api", "projector"]).await?;
    let address = free_address()?;
    let service = |which: Service| -> anyhow::Result<Launch> {
        Ok(crate::bench::service(which, &free_address()?, &database)
            // One tenant at full speed: the per-tenant limit would be what is measured.
            .env("RATE_LIMIT_PER_TENANT", "0")
            .env("KAFKA_BROKERS", &broker.address)
            .env("COMMAND_API_ADDR", &address))
    };
    let mut services = launch::start(vec![
        service(Service::CommandApi)?,
        service(Service::ProcessManager)?,
        service(Service::Projector)?,
    ])
    .await?;
    let base = format!("http://{address}");
    let token = service_token(SECRET, "bench", "bench", &["teller"])?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let load = Load {
        client,
        base,
        token,
    };
    let accounts = load.accounts().await?;
    // Up by the time transfers are sent: the deposit run comes first.
    let (watching, sightings) = crate::pipeline_bench::watch_topic(&broker.kafka(), "transfer")?;

    println!("deposits, {clients} clients, {seconds} s...");
    let deposits = load.closed_loop(&accounts, clients, seconds, false).await;
    println!("transfers, {clients} clients, {seconds} s...");
    let (saturated, saturated_backlog) =
        Backlog::watch(&pool, load.closed_loop(&accounts, clients, seconds, true)).await?;
    let saturated_ends = settled(&pool, &saturated.sent, &sightings).await?;
    let rate_option = rate.map_or_else(String::new, |rate| format!(" --rate {rate}"));
    let rate = match rate {
        Some(rate) => rate,
        None => (completed_per_second(&saturated, &saturated_ends)? * 0.8) as u64,
    }
    .max(1);
    println!("transfers at {rate}/s for {seconds} s...");
    let (steady, steady_backlog) =
        Backlog::watch(&pool, load.fixed_rate(&accounts, rate, seconds)).await?;
    let steady_ends = settled(&pool, &steady.sent, &sightings).await?;
    watching.abort();
    let outcomes = outcomes(&pool).await?;
    launch::stop(&mut services).await;
    drop(broker);

    let mut out = String::new();
    writeln!(
        out,
        "## Transfers: end to end through the process manager\n"
    )?;
    writeln!(
        out,
        "{}; broker nisshi 0.8.1 (memory storage) on the same machine. `cargo xtask bench transfers \
         --seconds {seconds} --clients {clients}{rate_option}`: command-api (with its relay), \
         `command-api process-transfers` and the projector as release processes; {ACCOUNTS} accounts \
         funded well enough that every transfer completes. Closed-loop clients send as fast as they are \
         answered (a refused one waits its `Retry-After`); the steady run sends at a fixed rate, 80% of \
         what the saturating run completed per second (counted to its last final event, its drain \
         included) unless `--rate` is given. \"Completed/s\" counts \
         the transfers whose final event was recorded while the run sent, over the time it sent; \
         \"in flight\" is `transfers_in_flight` (accepted, not final) sampled every 100 ms while it \
         sent: its largest value and its value when the run's last answer arrived. \"End to end\" is from \
         sending the request to the transfer's final event being \
         recorded (its `recorded_at` in the event store, same clock). A transfer is five appends in \
         four statements (request; debit; debited; credit; credited + completed) and one trip through \
         Kafka before it is final (the manager's own events come back through Kafka once more, \
         finding it final); a deposit is one append.\n",
        machine().await
    )?;
    writeln!(
        out,
        "| workload | accepted/s | completed/s | in flight: max / at end | request p50 / p99 ms | end to end p50 / p99 ms |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    let mut request = deposits.latencies.clone();
    request.sort_unstable();
    writeln!(
        out,
        "| deposits, {clients} clients (baseline) | {:.0} | {:.0} | - | {:.2} / {:.2} | - |",
        deposits.sent.len() as f64 / deposits.elapsed.as_secs_f64(),
        deposits.sent.len() as f64 / deposits.elapsed.as_secs_f64(),
        percentile_ms(&request, 0.50),
        percentile_ms(&request, 0.99),
    )?;
    let runs = [
        (
            format!("transfers, {clients} clients"),
            &saturated,
            &saturated_ends,
            &saturated_backlog,
        ),
        (
            format!("transfers at {rate}/s"),
            &steady,
            &steady_ends,
            &steady_backlog,
        ),
    ];
    for (name, run, ends, backlog) in &runs {
        let mut request = run.latencies.clone();
        request.sort_unstable();
        let mut end_to_end = stage(run, ends, |sent, timeline| Some(timeline.end - sent));
        end_to_end.sort_unstable();
        writeln!(
            out,
            "| {name} | {:.0} | {:.0} | {} / {} | {:.2} / {:.2} | {:.1} / {:.1} |",
            run.sent.len() as f64 / run.elapsed.as_secs_f64(),
            completed_while_sending(run, ends),
            backlog.max,
            backlog.last,
            percentile_ms(&request, 0.50),
            percentile_ms(&request, 0.99),
            percentile_ms(&end_to_end, 0.50),
            percentile_ms(&end_to_end, 0.99),
        )?;
    }
    writeln!(
        out,
        "\nWhere a transfer's time goes: the request's own append (from sending it to its \
         `recorded_at`, the start of the appending statement); the relay handing it to its \
         producer (the message's create time, ms precision); the broker, to a consumer on the \
         transfer topic with the process manager's settings (in the bench process, a group of its \
         own); the manager taking the message, loading the transfer and deciding the source \
         account's step (to that step's `recorded_at`); its three more appends, to the final \
         event's.\n"
    )?;
    writeln!(
        out,
        "| workload (p50 / p99) | sent → requested | requested → producer | producer → consumer | consumer → first step | first step → final |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for (name, run, ends, _) in &runs {
        let stages = [
            stage(run, ends, |sent, timeline| Some(timeline.requested - sent)),
            stage(run, ends, |_, timeline| {
                Some(timeline.produced? - timeline.requested)
            }),
            stage(run, ends, |_, timeline| {
                Some(timeline.received? - timeline.produced?)
            }),
            stage(run, ends, |_, timeline| {
                Some(timeline.first_step? - timeline.received?)
            }),
            stage(run, ends, |_, timeline| {
                Some(timeline.end - timeline.first_step?)
            }),
        ];
        let cells: Vec<String> = stages
            .into_iter()
            .map(|mut stage| {
                stage.sort_unstable();
                format!(
                    "{:.1} / {:.1} ms",
                    percentile_ms(&stage, 0.50),
                    percentile_ms(&stage, 0.99)
                )
            })
            .collect();
        writeln!(out, "| {name} | {} |", cells.join(" | "))?;
    }
    let traced = |ends: &HashMap<Uuid, Timeline>| {
        ends.values()
            .filter(|timeline| {
                timeline.produced.is_some()
                    && timeline.received.is_some()
                    && timeline.first_step.is_some()
            })
            .count()
    };
    writeln!(
        out,
        "\nTransfers traced through every leg (the others count in the legs they can be timed for): \
         {} of {} saturating, {} of {} steady.",
        traced(&saturated_ends),
        saturated_ends.len(),
        traced(&steady_ends),
        steady_ends.len(),
    )?;
    writeln!(
        out,
        "\nOutcomes: {} completed, {} rejected, {} failed. Transfer requests refused with 503 \
         and `Retry-After` (too many in flight; the clients waited as told): {} at {rate}/s, {} \
         with {clients} clients. Requests that failed otherwise: {}.",
        outcomes.get("TransferCompleted").unwrap_or(&0),
        outcomes.get("TransferRejected").unwrap_or(&0),
        outcomes.get("TransferFailed").unwrap_or(&0),
        steady.refused,
        saturated.refused,
        saturated.failed + steady.failed + deposits.failed,
    )?;
    println!("{out}");
    write_section("transfers", &out)?;
    println!("written to BENCHMARKS.md");
    Ok(())
}

#[derive(Clone)]
struct Load {
    client: reqwest::Client,
    base: String,
    token: String,
}

/// What a load run sent: each transfer (or deposit) id with the moment it was sent, the
/// request latencies in microseconds, requests refused with `Retry-After` and requests that
/// failed otherwise, and how long the run took.
struct Run {
    sent: Vec<(Uuid, DateTime<Utc>)>,
    latencies: Vec<u32>,
    refused: usize,
    failed: usize,
    elapsed: Duration,
}

/// How the command API answered one request.
enum Sent {
    Accepted(Uuid),
    /// 503 with `Retry-After`: too many transfers in flight; try again after the wait.
    Refused(Duration),
    Failed,
}

impl Load {
    async fn accounts(&self) -> anyhow::Result<Vec<Uuid>> {
        let accounts =
            crate::bench::open_accounts(&self.client, &self.base, &self.token, ACCOUNTS).await?;
        for id in &accounts {
            self.client
                .post(format!("{}/v1/accounts/{id}/deposits", self.base))
                .bearer_auth(&self.token)
                .json(&json!({"amount": INITIAL_BALANCE, "currency": "EUR"}))
                .send()
                .await?
                .error_for_status()?;
        }
        Ok(accounts)
    }

    /// One request: a transfer between two accounts picked by `n`, or a deposit into one.
    async fn send(&self, accounts: &[Uuid], n: usize, transfer: bool) -> Sent {
        let from = accounts[n % accounts.len()];
        let to = accounts[(n * 7 + 1) % accounts.len()];
        let request = if transfer && from != to {
            self.client
                .post(format!("{}/v1/transfers", self.base))
                .json(&json!({"from_account": from, "to_account": to, "amount": 1, "currency": "EUR"}))
        } else {
            self.client
                .post(format!("{}/v1/accounts/{from}/deposits", self.base))
                .json(&json!({"amount": 1, "currency": "EUR"}))
        };
        let Ok(response) = request.bearer_auth(&self.token).send().await else {
            return Sent::Failed;
        };
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok()?.parse().ok());
            if let Some(seconds) = wait {
                return Sent::Refused(Duration::from_secs(seconds));
            }
        }
        let Ok(response) = response.error_for_status() else {
            return Sent::Failed;
        };
        let Ok(reply) = response.json::<serde_json::Value>().await else {
            return Sent::Failed;
        };
        reply["transfer_id"]
            .as_str()
            .or(reply["account_id"].as_str())
            .and_then(|id| id.parse().ok())
            .map_or(Sent::Failed, Sent::Accepted)
    }

    async fn closed_loop(
        &self,
        accounts: &[Uuid],
        clients: usize,
        seconds: u64,
        transfer: bool,
    ) -> Run {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(seconds);
        let workers = (0..clients).map(|worker| async move {
            let mut sent = Vec::new();
            let mut latencies = Vec::new();
            let (mut refused, mut failed) = (0, 0);
            let mut n = worker;
            while Instant::now() < deadline {
                let at = Utc::now();
                let began = Instant::now();
                match self.send(accounts, n, transfer).await {
                    Sent::Accepted(id) => {
                        latencies.push(began.elapsed().as_micros() as u32);
                        sent.push((id, at));
                    }
                    // As a client should: it waits as told, then sends the next one.
                    Sent::Refused(wait) => {
                        refused += 1;
                        tokio::time::sleep(wait.min(deadline - Instant::now())).await;
                    }
                    Sent::Failed => failed += 1,
                }
                n += clients;
            }
            (sent, latencies, refused, failed)
        });
        let mut run = Run {
            sent: Vec::new(),
            latencies: Vec::new(),
            refused: 0,
            failed: 0,
            elapsed: Duration::ZERO,
        };
        for (sent, latencies, refused, failed) in futures::future::join_all(workers).await {
            run.sent.extend(sent);
            run.latencies.extend(latencies);
            run.refused += refused;
            run.failed += failed;
        }
        run.elapsed = started.elapsed();
        run
    }

    /// Sends a transfer every `1/rate` s, each on its own task, whatever the answers take.
    async fn fixed_rate(&self, accounts: &[Uuid], rate: u64, seconds: u64) -> Run {
        let started = Instant::now();
        let accounts: std::sync::Arc<[Uuid]> = accounts.into();
        let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
        let mut requests = tokio::task::JoinSet::new();
        for n in 0..(rate * seconds) as usize {
            ticker.tick().await;
            let (load, accounts) = (self.clone(), accounts.clone());
            requests.spawn(async move {
                let at = Utc::now();
                let began = Instant::now();
                let sent = load.send(&accounts, n, true).await;
                (sent, at, began.elapsed().as_micros() as u32)
            });
        }
        let mut run = Run {
            sent: Vec::new(),
            latencies: Vec::new(),
            refused: 0,
            failed: 0,
            elapsed: Duration::ZERO,
        };
        while let Some(result) = requests.join_next().await {
            match result {
                Ok((Sent::Accepted(id), at, latency)) => {
                    run.sent.push((id, at));
                    run.latencies.push(latency);
                }
                Ok((Sent::Refused(_), ..)) => run.refused += 1,
                Ok((Sent::Failed, ..)) | Err(_) => run.failed += 1,
            }
        }
        run.elapsed = started.elapsed();
        run
    }
}

/// Transfers of `run` completed per second, from the first request to the last final event:
/// what the system completed, its drain included, which sets the steady run's rate.
fn completed_per_second(run: &Run, ends: &HashMap<Uuid, Timeline>) -> anyhow::Result<f64> {
    let first = run
        .sent
        .iter()
        .map(|(_, at)| *at)
        .min()
        .context("no transfers")?;
    let last = ends
        .values()
        .map(|timeline| timeline.end)
        .max()
        .context("no transfer settled")?;
    let span = (last - first).to_std().unwrap_or_default().as_secs_f64();
    Ok(ends.len() as f64 / span.max(1e-9))
}

/// Transfers of `run` whose final event was recorded while it sent, per second of sending.
fn completed_while_sending(run: &Run, ends: &HashMap<Uuid, Timeline>) -> f64 {
    let (Some(first), Some(last)) = (
        run.sent.iter().map(|(_, at)| *at).min(),
        run.sent.iter().map(|(_, at)| *at).max(),
    ) else {
        return 0.0;
    };
    let completed = ends
        .values()
        .filter(|timeline| (first..=last).contains(&timeline.end))
        .count();
    let span = (last - first).to_std().unwrap_or_default().as_secs_f64();
    completed as f64 / span.max(1e-9)
}

/// One stage of each transfer of `run` in microseconds, for those `between` can tell.
fn stage(
    run: &Run,
    ends: &HashMap<Uuid, Timeline>,
    between: impl Fn(DateTime<Utc>, &Timeline) -> Option<chrono::TimeDelta>,
) -> Vec<u32> {
    run.sent
        .iter()
        .filter_map(|(id, sent)| {
            let took = between(*sent, ends.get(id)?)?;
            Some(took.num_microseconds()?.max(0) as u32)
        })
        .collect()
}

/// When a transfer's events were recorded (its request, the first account step the manager
/// took for it, its final event), and when its request was handed to the relay's producer and
/// received by the bench's consumer.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    requested: DateTime<Utc>,
    produced: Option<DateTime<Utc>>,
    received: Option<DateTime<Utc>>,
    /// None for a transfer no account took a step of (one refused before any).
    first_step: Option<DateTime<Utc>>,
    end: DateTime<Utc>,
}

/// Waits until every transfer of `sent` is final and returns each one's [`Timeline`].
async fn settled(
    pool: &PgPool,
    sent: &[(Uuid, DateTime<Utc>)],
    sightings: &Sightings,
) -> anyhow::Result<HashMap<Uuid, Timeline>> {
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.to_string()).collect();
    let started = Instant::now();
    loop {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events
              WHERE aggregate_type = 'transfer' AND aggregate_id = ANY($1)
                AND event_type IN ('TransferCompleted', 'TransferRejected', 'TransferFailed')",
        )
        .bind(&ids)
        .fetch_one(pool)
        .await?;
        if ended == ids.len() as i64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "{} of {} transfers did not settle in 5 minutes",
                ids.len() as i64 - ended,
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows: Vec<(String, Timeline)> =
        sqlx::query_as::<_, (String, DateTime<Utc>, DateTime<Utc>)>(
            "SELECT aggregate_id,
                min(recorded_at) FILTER (WHERE event_type = 'TransferRequested'),
                max(recorded_at) FILTER (WHERE event_type IN
                    ('TransferCompleted', 'TransferRejected', 'TransferFailed'))
           FROM events
          WHERE aggregate_type = 'transfer' AND aggregate_id = ANY($1)
          GROUP BY aggregate_id",
        )
        .bind(&ids)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(id, requested, end)| {
            (
                id,
                Timeline {
                    requested,
                    produced: None,
                    received: None,
                    first_step: None,
                    end,
                },
            )
        })
        .collect();
    let first_steps: HashMap<String, DateTime<Utc>> = sqlx::query_as(
        "SELECT metadata->>'correlation_id', min(recorded_at)
           FROM events
          WHERE aggregate_type = 'account' AND metadata->>'correlation_id' = ANY($1)
          GROUP BY 1",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    // The probe may still be reading the last requests.
    let probing = Instant::now();
    while probing.elapsed() < Duration::from_secs(10)
        && sent.iter().any(|(id, _)| {
            !sightings
                .lock()
                .expect("sightings lock")
                .contains_key(&(*id, 1))
        })
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sightings = sightings.lock().expect("sightings lock");
    rows.into_iter()
        .map(|(id, mut timeline)| {
            let id: Uuid = id.parse()?;
            timeline.first_step = first_steps.get(&id.to_string()).copied();
            if let Some(&(produced, received)) = sightings.get(&(id, 1)) {
                timeline.produced = produced.and_then(DateTime::from_timestamp_micros);
                timeline.received = DateTime::from_timestamp_micros(received);
            }
            Ok((id, timeline))
        })
        .collect()
}

/// The transfers in flight while a run sends: the most seen, and the last count.
struct Backlog {
    max: i64,
    last: i64,
}

impl Backlog {
    /// Runs `load`, counting `transfers_in_flight` every 100 ms until it ends.
    async fn watch(
        pool: &PgPool,
        load: impl std::future::Future<Output = Run>,
    ) -> anyhow::Result<(Run, Backlog)> {
        let mut max = 0;
        let count = || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM transfers_in_flight");
        let counting = async {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                match count().fetch_one(pool).await {
                    Ok(now) => max = max.max(now),
                    Err(err) => return err,
                }
            }
        };
        let run = tokio::select! {
            run = load => run,
            err = counting => return Err(err.into()),
        };
        let last = count().fetch_one(pool).await?;
        Ok((
            run,
            Backlog {
                max: max.max(last),
                last,
            },
        ))
    }
}

async fn outcomes(pool: &PgPool) -> anyhow::Result<HashMap<String, i64>> {
    Ok(sqlx::query_as::<_, (String, i64)>(
        "SELECT event_type, count(*) FROM events
          WHERE aggregate_type = 'transfer'
            AND event_type IN ('TransferCompleted', 'TransferRejected', 'TransferFailed')
          GROUP BY event_type",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect())
}
