//! `cargo xtask bench graphql`: GraphQL subscriptions under load, and GraphQL against REST for
//! the same read. The whole system (command API with its relay, projector, query API, broker)
//! runs as release processes; WebSocket subscribers (`graphql-transport-ws`, `accountChanged`)
//! hold one query API while deposits flow through the command API at a fixed rate. Measured:
//! each delivery's latency from the deposit's HTTP response, lost and duplicated deliveries,
//! the query API's memory, the CPU each process used, and read throughput. Writes its section
//! of `BENCHMARKS.md`, then fails if a delivery was lost, doubled or a subscriber dropped.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use service_kit::db::DatabaseConfig;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use uuid::Uuid;

use crate::bench::{
    Run, SECRET, machine, open_accounts, percentile_ms, reset_database, rss_kib, service,
    service_token, write_section,
};
use crate::broker;
use crate::cpu;
use crate::launch::{self, Profile, Service, free_address};

const TENANT: &str = "bench";
/// Subscribers connecting at once: enough to be quick, few enough not to overflow the
/// listener's accept queue.
const CONNECT_AT_ONCE: usize = 100;
/// How long the subscribers may take, after the last deposit was answered, to receive it.
const DRAIN_WITHIN: Duration = Duration::from_secs(30);
const SUBSCRIPTION: &str = "subscription ($id: UUID!) { accountChanged(id: $id) { version account { balance } entries { version amount } } }";
const ACCOUNT_QUERY: &str = "query ($id: UUID!) { account(id: $id) { balance version } }";

/// `cargo xtask bench graphql`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// WebSocket subscribers on the one query API, each with its own token.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Accounts the subscribers watch and the deposits go to, round robin.
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Deposits per second, sent on a fixed schedule whatever the answers' speed.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// How long the deposits flow.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Clients of the GraphQL-against-REST read comparison, each reading back to back.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Length of each read comparison run.
    #[arg(long, default_value_t = 10)]
    read_seconds: u64,
}

/// Where the system under test listens, and how to call it.
struct System {
    commands: String,
    queries: String,
    client: reqwest::Client,
    /// Teller and viewer of [`TENANT`], for the deposits and the reads.
    token: String,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ledger_bench_graphql".into());
    let database = DatabaseConfig::with_url(&server);
    launch::build(Profile::Release, &["command-api", "projector", "query-api"]).await?;
    // What else keeps the machine busy, measured before anything of ours runs.
    let idle = cpu::Sample::take(&[])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let background = cpu::Sample::take(&[])?.since(&idle).machine_cores();

    reset_database(&database).await?;
    let broker = broker::start(broker::Storage::Memory).await?;
    let kafka = broker.kafka();
    let (command_addr, query_addr) = (free_address()?, free_address()?);
    let process = |which: Service| -> anyhow::Result<launch::Launch> {
        Ok(service(which, &free_address()?, &database)
            .env("KAFKA_BROKERS", &kafka.brokers)
            .env("COMMAND_API_ADDR", &command_addr)
            .env("QUERY_API_ADDR", &query_addr)
            // One tenant at full speed: the per-tenant budget would be what is measured.
            .env("RATE_LIMIT_PER_TENANT", "0"))
    };
    let mut services = launch::start(vec![
        process(Service::CommandApi)?,
        process(Service::Projector)?,
        process(Service::QueryApi)?,
    ])
    .await?;
    let query_pid = services[2].pid().context("the query API exited")?;
    let mut pids = Vec::new();
    for process in &services {
        pids.push((
            process.label().to_owned(),
            process.pid().context("a service exited")?,
        ));
    }
    pids.push(("broker".into(), broker.pid().context("the broker exited")?));
    pids.push(("load generator".into(), std::process::id()));

    let system = Arc::new(System {
        commands: format!("http://{command_addr}"),
        queries: format!("http://{query_addr}"),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?,
        token: service_token(SECRET, TENANT, "bench", &["teller", "viewer"])?,
    });
    let accounts: Arc<[Uuid]> = open_accounts(
        &system.client,
        &system.commands,
        &system.token,
        options.accounts,
    )
    .await?
    .into();
    // The projector joins its consumer group first (seconds), then every account shows; each
    // read waits for it up to the query API's longest `min_version` wait.
    let visible_by = Instant::now() + Duration::from_secs(60);
    for account in accounts.iter() {
        while !system
            .client
            .get(format!(
                "{}/v1/accounts/{account}?min_version=1",
                system.queries
            ))
            .bearer_auth(&system.token)
            .send()
            .await?
            .status()
            .is_success()
        {
            if Instant::now() > visible_by {
                bail!("warm-up: account {account} is not visible in the query API within 60 s");
            }
        }
    }

    let rss_before = rss_kib(query_pid)?;
    println!("subscribing {} WebSocket clients...", options.subscribers);
    let subscribers = subscribe(&query_addr, &accounts, options.subscribers).await?;
    let rss_subscribed = rss_kib(query_pid)?;

    println!("{} deposits/s for {} s...", options.rate, options.seconds);
    let (sampling, sampler) = watch::channel(false);
    let peak = tokio::spawn(peak_rss(query_pid, sampler));
    let cpu_before = cpu::Sample::take(&pids)?;
    let started = Instant::now();
    let deposits = deposit(&system, &accounts, options.rate, options.seconds).await;
    let load_elapsed = started.elapsed();
    let cpu = cpu::Sample::take(&pids)?.since(&cpu_before);
    let drained = subscribers.drain(&deposits).await;
    let deliveries = subscribers.finish().await?;
    sampling.send_replace(true);
    let rss_peak = peak.await??;

    // Past this, the query API answers no account from memory: both APIs read from Postgres.
    // Sooner, REST would read from memory while the deposits' notifications were fresh, and
    // GraphQL after it would not.
    tokio::time::sleep(query_api::FRESH_FOR + Duration::from_secs(1)).await;
    println!("reads at {} clients...", options.clients);
    let duration = Duration::from_secs(options.read_seconds);
    let mut reads = Vec::new();
    for read in [Read::Rest, Read::Graphql] {
        // A short warm-up fills the connection pools.
        read.load(&system, &accounts, options.clients, Duration::from_secs(1))
            .await;
        reads.push(
            read.load(&system, &accounts, options.clients, duration)
                .await,
        );
    }
    launch::stop(&mut services).await;
    drop(broker);

    let outcome = Outcome::of(&deposits, &deliveries);
    let report = report(
        options,
        Measured {
            background,
            deposits: &deposits,
            load_elapsed,
            drained,
            outcome: &outcome,
            rss: [rss_before, rss_subscribed, rss_peak],
            cpu: &cpu,
            reads: &reads,
        },
    )
    .await?;
    println!("{report}");
    write_section("graphql", &report)?;
    println!("written to BENCHMARKS.md");
    if outcome.lost + outcome.duplicated + outcome.out_of_order > 0 || outcome.dropped > 0 {
        bail!(
            "deliveries went wrong: {} lost, {} duplicated, {} out of order, {} subscribers dropped",
            outcome.lost,
            outcome.duplicated,
            outcome.out_of_order,
            outcome.dropped
        );
    }
    Ok(())
}

/// One change as a subscriber received it: an entry's version, and when.
struct Delivery {
    version: i64,
    at: Instant,
}

/// What one subscriber saw.
struct Subscription {
    /// Index into the accounts.
    account: usize,
    deliveries: Vec<Delivery>,
    /// Why the subscription ended before it was asked to, if it did.
    ended: Option<String>,
}

/// The running subscribers.
struct Subscribers {
    tasks: Vec<JoinHandle<anyhow::Result<Subscription>>>,
    /// Per subscriber: its account, and the highest version it has received.
    seen: Vec<(usize, Arc<AtomicI64>)>,
    stop: watch::Sender<bool>,
}

/// `count` subscribers, round robin over `accounts`, each on its own connection with its own
/// token; returns once each has received its account's current state (so its feed is live).
async fn subscribe(
    query_addr: &str,
    accounts: &[Uuid],
    count: usize,
) -> anyhow::Result<Subscribers> {
    let (stop, stopping) = watch::channel(false);
    let mut subscribers = Subscribers {
        tasks: Vec::with_capacity(count),
        seen: Vec::with_capacity(count),
        stop,
    };
    let url = format!("ws://{query_addr}/graphql/ws");
    for first in (0..count).step_by(CONNECT_AT_ONCE) {
        let mut ready = Vec::new();
        for index in first..(first + CONNECT_AT_ONCE).min(count) {
            let account = index % accounts.len();
            let seen = Arc::new(AtomicI64::new(0));
            let (subscribed, waiting) = oneshot::channel();
            let token = service_token(SECRET, TENANT, &format!("subscriber-{index}"), &["viewer"])?;
            subscribers.tasks.push(tokio::spawn(subscriber(
                url.clone(),
                token,
                (account, accounts[account]),
                seen.clone(),
                subscribed,
                stopping.clone(),
            )));
            subscribers.seen.push((account, seen));
            ready.push((index, waiting));
        }
        for (index, waiting) in ready {
            if tokio::time::timeout(Duration::from_secs(30), waiting)
                .await
                .is_ok_and(|subscribed| subscribed.is_ok())
            {
                continue;
            }
            let task = subscribers.tasks.swap_remove(index);
            task.abort();
            let why = match task.await {
                Ok(Err(err)) => format!("{err:#}"),
                Ok(Ok(subscription)) => subscription.ended.unwrap_or_default(),
                Err(_) => "no first change within 30 s".into(),
            };
            bail!("subscriber {index} could not subscribe: {why}");
        }
    }
    Ok(subscribers)
}

impl Subscribers {
    /// Waits until every subscriber has received the last version answered for its account,
    /// at most [`DRAIN_WITHIN`]; how long that took after the last answer.
    async fn drain(&self, deposits: &Deposits) -> Option<Duration> {
        let started = Instant::now();
        let last = deposits.last_versions();
        while started.elapsed() < DRAIN_WITHIN {
            if self.seen.iter().all(|(account, seen)| {
                seen.load(Ordering::Relaxed) >= last.get(account).copied().unwrap_or(0)
            }) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Ends every subscription; what each received.
    async fn finish(self) -> anyhow::Result<Vec<Subscription>> {
        self.stop.send_replace(true);
        let mut subscriptions = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            subscriptions.push(task.await??);
        }
        Ok(subscriptions)
    }
}

/// One `graphql-transport-ws` client: `connection_init` with `token`, one `accountChanged`
/// subscription, every entry received recorded with its arrival time, until `stop`.
async fn subscriber(
    url: String,
    token: String,
    (account, id): (usize, Uuid),
    seen: Arc<AtomicI64>,
    subscribed: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Subscription> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .context("connecting")?;
    let send = |message: serde_json::Value| Message::text(message.to_string());
    socket
        .send(send(
            json!({"type": "connection_init", "payload": {"token": token}}),
        ))
        .await?;
    socket
        .send(send(json!({
            "id": "1",
            "type": "subscribe",
            "payload": {"query": SUBSCRIPTION, "variables": {"id": id}},
        })))
        .await?;
    let mut subscribed = Some(subscribed);
    let mut deliveries = Vec::new();
    let ended = loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = stop.wait_for(|stop| *stop) => break None,
        };
        let at = Instant::now();
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                break Some(frame.map_or_else(
                    || "closed by the server".to_owned(),
                    |frame| format!("closed by the server: {} {}", frame.code, frame.reason),
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => break Some(format!("connection failed: {err}")),
            None => break Some("connection ended".into()),
        };
        let message: serde_json::Value = serde_json::from_str(text.as_str())?;
        match message["type"].as_str() {
            Some("connection_ack") => {}
            Some("ping") => socket.send(send(json!({"type": "pong"}))).await?,
            Some("next") => {
                let change = &message["payload"]["data"]["accountChanged"];
                let Some(version) = change["version"].as_i64() else {
                    break Some(format!("not a change: {}", message["payload"]));
                };
                for entry in change["entries"].as_array().into_iter().flatten() {
                    if let Some(version) = entry["version"].as_i64() {
                        deliveries.push(Delivery { version, at });
                    }
                }
                seen.fetch_max(version, Ordering::Relaxed);
                if let Some(subscribed) = subscribed.take() {
                    let _ = subscribed.send(());
                }
            }
            _ => break Some(format!("unexpected message: {text}")),
        }
    };
    let _ = socket.close(None).await;
    Ok(Subscription {
        account,
        deliveries,
        ended,
    })
}

/// The deposits made: per account index, each answered version and when it was answered.
struct Deposits {
    answered: HashMap<(usize, i64), Instant>,
    sent: usize,
    failed: usize,
}

impl Deposits {
    fn last_versions(&self) -> HashMap<usize, i64> {
        let mut last = HashMap::new();
        for &(account, version) in self.answered.keys() {
            let highest = last.entry(account).or_insert(version);
            *highest = (*highest).max(version);
        }
        last
    }
}

/// `rate` deposits a second for `seconds`, round robin over `accounts`, each sent on schedule
/// whether or not the earlier ones were answered.
async fn deposit(system: &System, accounts: &[Uuid], rate: u64, seconds: u64) -> Deposits {
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let total = rate * seconds;
    for n in 0..total {
        ticker.tick().await;
        let account = n as usize % accounts.len();
        let request = system
            .client
            .post(format!(
                "{}/v1/accounts/{}/deposits",
                system.commands, accounts[account]
            ))
            .bearer_auth(&system.token)
            .json(&json!({"amount": 1, "currency": "EUR"}));
        tasks.spawn(async move {
            let reply: serde_json::Value = request
                .send()
                .await
                .ok()?
                .error_for_status()
                .ok()?
                .json()
                .await
                .ok()?;
            let answered = Instant::now();
            Some((account, reply["version"].as_i64()?, answered))
        });
    }
    let mut deposits = Deposits {
        answered: HashMap::new(),
        sent: total as usize,
        failed: 0,
    };
    while let Some(result) = tasks.join_next().await {
        match result.ok().flatten() {
            Some((account, version, answered)) => {
                deposits.answered.insert((account, version), answered);
            }
            None => deposits.failed += 1,
        }
    }
    deposits
}

/// What the subscribers received, against what was answered.
struct Outcome {
    /// Each delivery's latency after its deposit's answer, sorted, microseconds.
    latencies: Vec<u32>,
    expected: usize,
    lost: usize,
    duplicated: usize,
    out_of_order: usize,
    /// Subscriptions the server ended.
    dropped: usize,
    /// Why, for the first few.
    drop_reasons: Vec<String>,
}

impl Outcome {
    fn of(deposits: &Deposits, subscriptions: &[Subscription]) -> Self {
        let mut versions: HashMap<usize, Vec<i64>> = HashMap::new();
        for &(account, version) in deposits.answered.keys() {
            versions.entry(account).or_default().push(version);
        }
        let mut outcome = Self {
            latencies: Vec::new(),
            expected: 0,
            lost: 0,
            duplicated: 0,
            out_of_order: 0,
            dropped: 0,
            drop_reasons: Vec::new(),
        };
        for subscription in subscriptions {
            let mut received = HashSet::new();
            let mut highest = 0;
            for delivery in &subscription.deliveries {
                if !received.insert(delivery.version) {
                    outcome.duplicated += 1;
                } else if delivery.version < highest {
                    outcome.out_of_order += 1;
                }
                highest = highest.max(delivery.version);
                if let Some(answered) = deposits
                    .answered
                    .get(&(subscription.account, delivery.version))
                {
                    // A delivery may beat its answer back to this process; that is no latency.
                    let latency = delivery.at.saturating_duration_since(*answered);
                    outcome.latencies.push(latency.as_micros() as u32);
                }
            }
            let expected = versions
                .get(&subscription.account)
                .map_or(&[][..], Vec::as_slice);
            outcome.expected += expected.len();
            outcome.lost += expected
                .iter()
                .filter(|version| !received.contains(version))
                .count();
            if let Some(reason) = &subscription.ended {
                outcome.dropped += 1;
                if outcome.drop_reasons.len() < 3 {
                    outcome.drop_reasons.push(reason.clone());
                }
            }
        }
        outcome.latencies.sort_unstable();
        outcome
    }
}

/// The query API's highest resident memory until `done`, sampled every 250 ms, in KiB.
async fn peak_rss(pid: u32, mut done: watch::Receiver<bool>) -> anyhow::Result<u64> {
    let mut peak = rss_kib(pid)?;
    while tokio::time::timeout(Duration::from_millis(250), done.wait_for(|done| *done))
        .await
        .is_err()
    {
        peak = peak.max(rss_kib(pid)?);
    }
    Ok(peak.max(rss_kib(pid)?))
}

/// The same account read over either API.
#[derive(Clone, Copy)]
enum Read {
    Rest,
    Graphql,
}

impl Read {
    fn label(self) -> &'static str {
        match self {
            Self::Rest => "REST `GET /v1/accounts/{id}`",
            Self::Graphql => "GraphQL `POST /graphql` `{ account(id) { balance version } }`",
        }
    }

    fn request(self, system: &System, id: Uuid) -> reqwest::RequestBuilder {
        let request = match self {
            Self::Rest => system
                .client
                .get(format!("{}/v1/accounts/{id}", system.queries)),
            Self::Graphql => system
                .client
                .post(format!("{}/graphql", system.queries))
                .json(&json!({"query": ACCOUNT_QUERY, "variables": {"id": id}})),
        };
        request.bearer_auth(&system.token)
    }

    /// Whether the answer holds the account (GraphQL answers its errors with 200).
    async fn answered(self, response: reqwest::Response) -> bool {
        if !response.status().is_success() {
            return false;
        }
        match self {
            Self::Rest => response.bytes().await.is_ok(),
            Self::Graphql => response
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|body| {
                    body["errors"].is_null() && body["data"]["account"]["version"].is_i64()
                }),
        }
    }

    /// `clients` readers, each reading the accounts in turn back to back for `duration`.
    async fn load(
        self,
        system: &Arc<System>,
        accounts: &Arc<[Uuid]>,
        clients: usize,
        duration: Duration,
    ) -> Run {
        let started = Instant::now();
        let deadline = started + duration;
        let readers: Vec<_> = (0..clients)
            .map(|reader| {
                let (system, accounts) = (system.clone(), accounts.clone());
                tokio::spawn(async move {
                    let (mut ok, mut errors, mut server_errors) = (0, 0, 0);
                    let mut latencies = Vec::new();
                    let mut next = reader;
                    while Instant::now() < deadline {
                        let id = accounts[next % accounts.len()];
                        next += clients;
                        let sent = Instant::now();
                        match self.request(&system, id).send().await {
                            Ok(response) => {
                                let server_error = response.status().is_server_error();
                                if self.answered(response).await {
                                    ok += 1;
                                    latencies.push(sent.elapsed().as_micros() as u32);
                                } else {
                                    errors += 1;
                                    server_errors += usize::from(server_error);
                                }
                            }
                            Err(_) => errors += 1,
                        }
                    }
                    (ok, errors, server_errors, latencies)
                })
            })
            .collect();
        let mut counts = Vec::with_capacity(readers.len());
        for reader in readers {
            // A reader that panicked counts nothing.
            if let Ok(count) = reader.await {
                counts.push(count);
            }
        }
        Run::of_workers(self.label(), clients, started, counts)
    }
}

/// Everything the report shows.
struct Measured<'a> {
    /// Busy cores before the system started: other work on the machine.
    background: f64,
    deposits: &'a Deposits,
    load_elapsed: Duration,
    /// How long after the last answer every subscriber had its account's last version.
    drained: Option<Duration>,
    outcome: &'a Outcome,
    /// The query API's RSS in KiB: before the subscribers, with them idle, peak under load.
    rss: [u64; 3],
    cpu: &'a cpu::Spent,
    reads: &'a [Run],
}

async fn report(options: &Options, measured: Measured<'_>) -> anyhow::Result<String> {
    let Options {
        subscribers,
        accounts,
        rate,
        seconds,
        clients,
        read_seconds,
    } = *options;
    let Measured {
        background,
        deposits,
        load_elapsed,
        drained,
        outcome,
        rss,
        cpu,
        reads,
    } = measured;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut out = String::new();
    writeln!(
        out,
        "## GraphQL: subscribers under load, and GraphQL against REST\n"
    )?;
    writeln!(
        out,
        "{}; broker nisshi 0.8.1 (memory storage) on the same machine. `cargo xtask bench graphql \
         --subscribers {subscribers} --accounts {accounts} --rate {rate} --seconds {seconds}`: command API \
         (with its relay), projector and query API as release processes (JSON logs at `info` to \
         /dev/null, per-tenant rate limit off, other settings default), {accounts} accounts of one tenant. \
         {subscribers} WebSocket clients (`graphql-transport-ws`, each with its own token in \
         `connection_init`, one `accountChanged` subscription each, {} per account) hold the one query API \
         while deposits are sent to the command API at {rate}/s on a fixed schedule (open loop) for \
         {seconds} s. The load generator (the subscribers and the deposits, one process) runs on the same \
         cores; before the system started, other work kept {background:.2} cores of the machine busy. \
         A delivery's latency runs from the deposit's HTTP response to a subscriber receiving the change \
         that carries its version (each subscriber of the account is one sample).\n",
        machine().await,
        subscribers.div_ceil(accounts.max(1)),
    )?;
    writeln!(out, "| measure | result | target |")?;
    writeln!(out, "|---|---:|---:|")?;
    writeln!(
        out,
        "| deposits answered | {} of {} in {:.1} s ({} failed) | - |",
        deposits.answered.len(),
        deposits.sent,
        load_elapsed.as_secs_f64(),
        deposits.failed,
    )?;
    writeln!(
        out,
        "| delivery latency p50 / p99 / max | {:.1} / {:.1} / {:.1} ms | p99 ≤ 250 ms |",
        percentile_ms(&outcome.latencies, 0.50),
        percentile_ms(&outcome.latencies, 0.99),
        percentile_ms(&outcome.latencies, 1.0),
    )?;
    writeln!(
        out,
        "| deliveries expected / timed | {} / {} | - |",
        outcome.expected,
        outcome.latencies.len(),
    )?;
    writeln!(
        out,
        "| lost / duplicated / out of order | {} / {} / {} | 0 / 0 / 0 |",
        outcome.lost, outcome.duplicated, outcome.out_of_order,
    )?;
    let reasons = if outcome.drop_reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", outcome.drop_reasons.join("; "))
    };
    writeln!(
        out,
        "| subscriptions ended by the server{reasons} | {} | 0 |",
        outcome.dropped
    )?;
    writeln!(
        out,
        "| every subscriber had its account's last version, after the last answer | {} | - |",
        drained.map_or_else(
            || format!("not within {} s", DRAIN_WITHIN.as_secs()),
            |drained| format!("{} ms", drained.as_millis()),
        ),
    )?;
    writeln!(
        out,
        "| query API RSS: before / {subscribers} subscribers idle / peak under load | {:.1} / {:.1} / {:.1} MiB | - |",
        mib(rss[0]),
        mib(rss[1]),
        mib(rss[2]),
    )?;
    writeln!(
        out,
        "\nCPU while the deposits flowed, in cores of the machine's {} (\"Postgres and the rest\" is \
         the machine's busy time less the processes named):\n",
        std::thread::available_parallelism().map_or(0, usize::from),
    )?;
    let mut header = String::from("|");
    let mut rule = String::from("|");
    let mut row = String::from("|");
    let mut named = 0;
    for (label, ticks) in &cpu.processes {
        named += ticks;
        write!(header, " {label} |")?;
        rule.push_str("---:|");
        write!(row, " {:.2} |", cpu.cores(*ticks))?;
    }
    write!(header, " Postgres and the rest | machine busy |")?;
    rule.push_str("---:|---:|");
    write!(
        row,
        " {:.2} | {:.2} |",
        cpu.cores(cpu.busy.saturating_sub(named)),
        cpu.machine_cores()
    )?;
    writeln!(out, "{header}\n{rule}\n{row}")?;
    writeln!(
        out,
        "\nThe same account read over both APIs after the subscribers left, {clients} clients reading \
         back to back (HTTP/1.1 keep-alive), {read_seconds} s each after a 1 s warm-up, once the \
         deposits' notifications were too old for the query API to answer from memory (both read \
         from Postgres; `cargo xtask bench reads` measures reads from memory):\n"
    )?;
    writeln!(
        out,
        "| read | clients | ok/s | p50 ms | p99 ms | errors | vs REST |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    let rest = reads.first().map_or(f64::NAN, Run::throughput);
    for run in reads {
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {:.2}x |",
            run.label,
            run.concurrency,
            run.throughput(),
            run.percentile_ms(0.50),
            run.percentile_ms(0.99),
            run.errors,
            run.throughput() / rest,
        )?;
    }
    writeln!(out)?;
    Ok(out)
}
