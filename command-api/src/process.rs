//! The transfer process manager: drives every transfer to completed, rejected or
//! failed-and-refunded.
//!
//! It consumes the transfer topic, and for each message drives that transfer from its state in
//! the event store (never from the message): ask the account the next step needs (debit the
//! source, credit the destination, refund the source), record the account's answer on the
//! transfer, repeat until the transfer is final. Every step can be repeated safely: an account
//! takes each step of a transfer at most once and answers a repeat with the recorded outcome,
//! and a transfer accepts an outcome it already holds without change. So re-delivered
//! messages, a crash between two steps, or two managers on one transfer never move money twice.
//! Offsets are committed once the batch's transfers were driven.
//!
//! Transfers can still stall (every manager was down, or a step kept failing); on start-up and
//! then every `stuck_after` the manager drives the transfers that made no progress for that
//! long. It finds them in `transfers_in_flight`, which a trigger on the event store keeps in
//! the appending statement itself, so the sweep costs in proportion to the transfers not yet
//! final. A transfer that keeps failing is retried at every sweep and stays counted in
//! `ledger_transfers_stuck` (alert `LedgerTransfersStuck`) until it settles.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use domain::{
    AccountCommand, AccountError, AccountEvent, NextStep, StepOutcome, Transfer, TransferCommand,
    TransferError, TransferStatus, TransferStep, TransferTerms,
};
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use service_kit::config::{ConfigError, Setting};
use service_kit::db::{self, DatabaseConfig};
use service_kit::http::{Need, OpsServer, Readiness};
use service_kit::kafka::{self, BrokerProbe, ConsumerLag, KafkaConfig, headers};
use service_kit::retry;
use service_kit::server::{ANY_LOCAL_PORT, ServerLimits};
use service_kit::telemetry;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use cqrs_es::Aggregate;

use crate::StartError;
use crate::engine::{
    AppendSignal, CommandContext, CommandError, CommandService, EngineConfig, Target,
};

/// Messages taken per batch; their transfers are driven concurrently.
const MAX_BATCH: usize = 200;
/// Stuck transfers driven per sweep, at most: the rest wait for the next one.
pub const MAX_SWEEP: i64 = 1000;
/// The namespace of the process manager's deterministic command ids.
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d74_7261_6e73_6665_7273);

pub const PROCESS_MANAGER_GROUP: Setting<&str> = Setting::new(
    "PROCESS_MANAGER_GROUP",
    "ledger-process-manager",
    "the transfer process manager's consumer group",
);
pub const PROCESS_MANAGER_ADDR: Setting<SocketAddr> = Setting::new(
    "PROCESS_MANAGER_ADDR",
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8083)),
    "the process manager's ops server: `/metrics`, `/health/live`, `/health/ready`",
);
pub const PROCESS_MANAGER_STUCK_AFTER: Setting<Duration> = Setting::new(
    "PROCESS_MANAGER_STUCK_AFTER_MS",
    Duration::from_secs(30),
    "a transfer without progress this long is resumed from the event store (also how often that is looked for)",
);

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    /// [`PROCESS_MANAGER_GROUP`]: the consumer group.
    pub group: String,
    /// [`PROCESS_MANAGER_STUCK_AFTER`]: a transfer with no progress for this long is driven
    /// from the event store; also how often that is looked for.
    pub stuck_after: Duration,
    /// As the command API's.
    pub engine: EngineConfig,
    /// [`PROCESS_MANAGER_ADDR`] (port 0 picks one): where the health probes and `/metrics`
    /// are served.
    pub listen: SocketAddr,
    /// The bounds of that listener: see `service_kit::server`.
    pub server: ServerLimits,
}

impl ProcessConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            database: DatabaseConfig::from_env()?,
            kafka: KafkaConfig::from_env()?,
            group: PROCESS_MANAGER_GROUP.read()?,
            stuck_after: PROCESS_MANAGER_STUCK_AFTER.read()?,
            engine: EngineConfig::from_env()?,
            listen: PROCESS_MANAGER_ADDR.read()?,
            server: ServerLimits::from_env()?,
        })
    }

    /// For tests: `database` and `kafka`, a consumer group of the test's own (named after its
    /// topic prefix, so that tests sharing a broker do not rebalance each other), the ops
    /// listener on a free port, and every other setting at its default.
    pub fn for_tests(database: DatabaseConfig, kafka: KafkaConfig) -> Self {
        Self {
            database,
            group: format!("{}-process-manager", kafka.topic_prefix),
            kafka,
            stuck_after: PROCESS_MANAGER_STUCK_AFTER.default,
            engine: EngineConfig::default(),
            listen: ANY_LOCAL_PORT,
            server: ServerLimits::default(),
        }
    }
}

pub struct ProcessManager {
    pool: PgPool,
    commands: CommandService,
    consumer: StreamConsumer<ConsumerLag>,
    signal: AppendSignal,
    stuck_after: Duration,
    /// Health probes and `/metrics`, until served.
    ops: Option<OpsServer>,
}

impl ProcessManager {
    /// Connects to (and migrates) the database and joins the consumer group of the transfer
    /// topic, creating it if needed.
    pub async fn build(config: ProcessConfig) -> Result<Self, StartError> {
        let pool = db::connect(&config.database).await?;
        db::migrate(&pool).await?;
        let topic = config.kafka.events_topic(Transfer::TYPE);
        if let Err(err) = config
            .kafka
            .ensure_topics(std::slice::from_ref(&topic))
            .await
        {
            tracing::warn!(error = %err, "could not ensure the transfer topic exists");
        }
        let consumer: StreamConsumer<ConsumerLag> = config
            .kafka
            .consumer(&config.group)
            .create_with_context(ConsumerLag("ledger_process_manager_lag_messages"))?;
        consumer.subscribe(&[&topic])?;
        let signal = AppendSignal::default();
        let commands = CommandService::new(pool.clone(), &config.engine, signal.clone());
        let readiness = Readiness::new(pool.clone())
            .with_kept_connections(commands.append_connections())
            .with_broker(BrokerProbe::new(&config.kafka)?, Need::Required);
        let ops = OpsServer::bind(config.listen, readiness, "process-manager", config.server)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Self {
            commands,
            pool,
            consumer,
            signal,
            stuck_after: config.stuck_after,
            ops: Some(ops),
        })
    }

    /// Runs until `shutdown` resolves; the batch in hand is finished first.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stopped| *stopped).await;
            }
        };
        let ops = self
            .ops
            .take()
            .map(|ops| tokio::spawn(ops.serve(until_stopped())));
        let manager = Arc::new(self);
        let forwarding = tokio::spawn(
            manager
                .signal
                .clone()
                .forward(manager.pool.clone(), until_stopped()),
        );
        let mut sweeps = tokio::time::interval(manager.stuck_after.max(Duration::from_secs(1)));
        sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batches = manager.consumer.stream().ready_chunks(MAX_BATCH);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = sweeps.tick() => manager.sweep().await,
                batch = batches.next() => match batch {
                    Some(batch) => {
                        let messages: Vec<BorrowedMessage<'_>> = batch
                            .into_iter()
                            .filter_map(|message| {
                                message
                                    .map_err(|err| tracing::warn!(error = %err, "kafka consumer error"))
                                    .ok()
                            })
                            .collect();
                        manager.handle(&messages).await;
                    }
                    None => break,
                },
            }
        }
        let _ = stop.send(true);
        let _ = forwarding.await;
        if let Some(ops) = ops {
            let _ = ops.await;
        }
        tracing::info!("process manager stopped");
    }

    /// Drives the transfers of a batch, then commits its offsets.
    #[tracing::instrument(skip_all, fields(messages = messages.len()))]
    async fn handle(&self, messages: &[BorrowedMessage<'_>]) {
        let mut traces: HashMap<Uuid, String> = HashMap::new();
        let mut transfers: Vec<Uuid> = messages
            .iter()
            .filter_map(|message| {
                let headers = message.headers();
                let id = headers
                    .and_then(|headers| kafka::header(headers, headers::SUBJECT))
                    .and_then(|subject| subject.parse().ok());
                if let (Some(id), Some(traceparent)) = (
                    id,
                    headers.and_then(|headers| kafka::header(headers, headers::TRACEPARENT)),
                ) {
                    traces.insert(id, traceparent.to_owned());
                }
                if id.is_none() {
                    tracing::error!(
                        partition = message.partition(),
                        offset = message.offset(),
                        "transfer message without a transfer id; skipped"
                    );
                }
                id
            })
            .collect();
        transfers.sort_unstable();
        transfers.dedup();
        self.drive_all(transfers, &traces).await;
        for message in messages {
            if let Err(err) = self.consumer.store_offset_from_message(message) {
                tracing::warn!(error = %err, "storing offset failed");
            }
        }
        if let Err(err) = self.consumer.commit_consumer_state(CommitMode::Async) {
            tracing::warn!(error = %err, "committing offsets failed; they will be re-delivered");
        }
    }

    /// Drives each transfer, continuing the trace of its message if `traces` has one; retries
    /// those that failed because the database was unavailable until they pass. Any other
    /// failure is logged and left to the sweep.
    async fn drive_all(&self, transfers: Vec<Uuid>, traces: &HashMap<Uuid, String>) {
        futures::future::join_all(transfers.into_iter().map(|id| {
            let span = tracing::info_span!("drive", transfer = %id);
            telemetry::continue_trace(&span, traces.get(&id).map(String::as_str));
            async move {
                let driven = (|| self.drive(id))
                    .retry(retry::policy())
                    .when(|err| matches!(err, CommandError::Unavailable(_)))
                    .notify(|err, _| {
                        tracing::warn!(transfer = %id, error = %err, "database unavailable; retrying")
                    })
                    .await;
                match driven {
                    Ok(status) => {
                        tracing::debug!(transfer = %id, status = status.as_str(), "transfer driven")
                    }
                    Err(err) => {
                        metrics::counter!("ledger_transfer_drive_failures_total").increment(1);
                        tracing::error!(transfer = %id, error = %err, "driving a transfer failed; the sweep will retry it");
                    }
                }
            }
            .instrument(span)
        }))
        .await;
    }

    /// Takes the transfer's next steps until it is final, and returns that status.
    async fn drive(&self, id: Uuid) -> Result<TransferStatus, CommandError> {
        loop {
            let transfer = self.commands.transfer_state(id).await?;
            let Some(requested) = transfer.state.state() else {
                return Err(TransferError::NotFound.into());
            };
            let NextStep::Ask { account, step } = transfer.state.next_step() else {
                return Ok(requested.status);
            };
            let terms = requested.terms.clone();
            let outcome = self.take_step(&terms, id, account, step).await?;
            let tenant = terms.tenant.clone();
            let record = match step {
                TransferStep::Debit => TransferCommand::RecordDebit { tenant, outcome },
                TransferStep::Credit => TransferCommand::RecordCredit { tenant, outcome },
                TransferStep::Refund => TransferCommand::RecordRefund { tenant },
            };
            let context = step_context(&terms, id, &format!("record-{step:?}"));
            self.commands
                .transfer(&context, Target::Existing(id), record)
                .await?;
        }
    }

    /// Asks `account` for the transfer's `step` and returns its answer, the recorded one if
    /// the step was already taken.
    async fn take_step(
        &self,
        terms: &TransferTerms,
        transfer_id: Uuid,
        account: Uuid,
        step: TransferStep,
    ) -> Result<StepOutcome, CommandError> {
        let command = AccountCommand::for_transfer_step(
            step,
            terms.tenant.clone(),
            transfer_id,
            terms.amount,
            terms.currency,
        );
        let context = step_context(terms, transfer_id, &format!("{step:?}"));
        match self
            .commands
            .account(&context, Target::Existing(account), command, None)
            .await
        {
            Ok(committed) => committed
                .events
                .iter()
                .filter_map(AccountEvent::transfer_step)
                .find(|&(id, taken, _)| id == transfer_id && taken == step)
                .map(|(_, _, outcome)| outcome)
                .ok_or_else(|| {
                    CommandError::Internal(anyhow::anyhow!(
                        "account {account} accepted the {step:?} of transfer {transfer_id} but did not record it"
                    ))
                }),
            Err(CommandError::Account(AccountError::TransferStepRecorded { outcome, .. })) => {
                Ok(outcome)
            }
            Err(err) => Err(err),
        }
    }

    /// Drives the transfers that made no progress for `stuck_after` (the longest-stuck first,
    /// at most [`MAX_SWEEP`] a run), and reports how many are stuck.
    async fn sweep(&self) {
        let stuck = stuck_transfers(&self.pool, self.stuck_after, MAX_SWEEP).await;
        match stuck {
            Ok((count, ids)) => {
                metrics::gauge!("ledger_transfers_stuck").set(count as f64);
                if ids.is_empty() {
                    return;
                }
                tracing::info!(
                    transfers = ids.len(),
                    stuck = count,
                    "resuming stuck transfers"
                );
                self.drive_all(ids, &HashMap::new()).await;
            }
            Err(err) => tracing::warn!(error = %err, "looking for stuck transfers failed"),
        }
    }
}

/// How many transfers made no progress for `stuck_after`, and the ids of the `limit` stuck
/// longest. Reads the table of transfers in flight, so its cost follows the transfers not yet
/// final, not history.
pub async fn stuck_transfers(
    pool: &PgPool,
    stuck_after: Duration,
    limit: i64,
) -> Result<(i64, Vec<Uuid>), sqlx::Error> {
    let older_than = stuck_after.as_secs_f64();
    let count = sqlx::query_scalar(
        "SELECT count(*) FROM transfers_in_flight
          WHERE last_event_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than)
    .fetch_one(pool)
    .await?;
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT transfer_id FROM transfers_in_flight
          WHERE last_event_at < now() - make_interval(secs => $1)
          ORDER BY last_event_at LIMIT $2",
    )
    .bind(older_than)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok((count, ids.iter().filter_map(|id| id.parse().ok()).collect()))
}

/// Who the manager's commands come from. The request id is the command's deterministic id:
/// the same for every repeat of a step, so a step's events name the command that took it.
fn step_context(terms: &TransferTerms, transfer_id: Uuid, step: &str) -> CommandContext {
    let command_id = Uuid::new_v5(
        &COMMAND_NAMESPACE,
        format!("{transfer_id}/{step}").as_bytes(),
    );
    CommandContext {
        tenant: terms.tenant.clone(),
        actor: "process-manager".into(),
        request_id: command_id.to_string(),
        correlation_id: transfer_id.to_string(),
        traceparent: telemetry::current_traceparent(),
        idempotency: None,
    }
}
