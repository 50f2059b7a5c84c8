//! `ledger-audit` as an auditor runs it: the real binary against a real event store written
//! by the real command API, whose relay publishes to a real broker.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use service_kit::{ExposeSecret, testing};
use test_system::TestSystem;
use uuid::Uuid;

struct Ledger {
    system: TestSystem,
}

impl Ledger {
    /// The system without its process manager: a transfer stays requested, one event.
    async fn start() -> Self {
        let mut system = TestSystem::start().await;
        system.kill_process_manager().await;
        Self { system }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let (status, reply) = self.system.command(path, Some(body), &[]).await;
        assert!(status.is_success(), "{path}: {status} {reply}");
        reply
    }

    /// Opens an account and deposits each of `amounts`.
    async fn account(&self, amounts: &[i64]) -> Uuid {
        let id = self.system.open(0).await;
        for amount in amounts {
            self.system.move_money(id, *amount).await;
        }
        id
    }

    /// Runs `ledger-audit` with `args`; returns whether it succeeded and what it printed.
    async fn audit(&self, args: &[&str]) -> (bool, String) {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger-audit"))
            .args(args)
            .env(
                "DATABASE_URL",
                self.system.database.config.url.expose_secret(),
            )
            .env("KAFKA_BROKERS", &self.system.kafka.brokers)
            .env("KAFKA_TOPIC_PREFIX", &self.system.kafka.topic_prefix)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.code().is_some_and(|code| code <= 1),
            "ledger-audit {args:?} failed: {stderr}"
        );
        (output.status.success(), stdout)
    }

    async fn tamper(&self, statements: &str, account: Uuid) {
        testing::tamper(&self.system.pool, statements, &account.to_string()).await;
    }

    async fn recorded_at(&self, account: Uuid, version: i64) -> DateTime<Utc> {
        sqlx::query_scalar(
            "SELECT recorded_at FROM events WHERE aggregate_id = $1 AND sequence = $2",
        )
        .bind(account.to_string())
        .bind(version)
        .fetch_one(&self.system.pool)
        .await
        .unwrap()
    }
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

#[tokio::test]
async fn verify_export_reverify_offline_and_replay() {
    let ledger = Ledger::start().await;
    let first = ledger.account(&[100, 200, 300]).await;
    let second = ledger.account(&[7]).await;
    // Between `first`'s version 3 and 4: its balance then was 300.
    let cut = ledger.recorded_at(first, 3).await;
    let events = 4 + 2;

    let (ok, out) = ledger.audit(&["verify"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("streams checked: 2"), "{out}");
    assert!(out.contains(&format!("events checked: {events}")), "{out}");
    assert!(out.contains("breaks found: 0"), "{out}");
    let (ok, out) = ledger.audit(&["verify", "--tenant", "acme"]).await;
    assert!(
        ok && out.contains(&format!("events checked: {events}")),
        "{out}"
    );
    let (ok, out) = ledger.audit(&["verify", "--tenant", "globex"]).await;
    assert!(ok && out.contains("events checked: 0"), "{out}");
    let first_id = first.to_string();
    let (ok, out) = ledger.audit(&["verify", "--account", &first_id]).await;
    assert!(ok && out.contains("events checked: 4"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let jsonl = path(dir.path(), "all.jsonl");
    let csv = path(dir.path(), "all.csv");
    let suffix = path(dir.path(), "suffix.jsonl");
    let from = cut.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    for args in [
        vec!["export", "--output", &jsonl],
        vec!["export", "--output", &csv],
        vec![
            "export",
            "--account",
            &first_id,
            "--from",
            &from,
            "--output",
            &suffix,
        ],
    ] {
        let (ok, _) = ledger.audit(&args).await;
        assert!(ok, "{args:?}");
    }
    for (file, count) in [(&jsonl, events), (&csv, events), (&suffix, 2)] {
        let (ok, out) = ledger.audit(&["verify", "--file", file]).await;
        assert!(ok, "{file}: {out}");
        assert!(out.contains(&format!("events checked: {count}")), "{out}");
    }
    let (_, out) = ledger.audit(&["verify", "--file", &suffix]).await;
    assert!(out.contains("starting after version 1"), "{out}");

    // An export edited after the fact no longer verifies, and says where.
    let edited: Vec<String> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|line| {
            let mut record: Value = serde_json::from_str(line).unwrap();
            if record["aggregate_id"] == first_id && record["sequence"] == 3 {
                record["payload"] = json!(
                    r#"{"MoneyDeposited":{"amount":201,"currency":"EUR","balance_after":301}}"#
                );
            }
            record.to_string()
        })
        .collect();
    let tampered = path(dir.path(), "tampered.jsonl");
    std::fs::write(&tampered, edited.join("\n")).unwrap();
    let (ok, out) = ledger.audit(&["verify", "--file", &tampered]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("account/{first} version 3: hash-mismatch")),
        "{out}"
    );

    // Balances as of the cut: `first` had 300 (versions 1-3), `second` did not exist yet
    // unless it was opened before the cut (it was not: it came after every deposit of `first`).
    let until = cut.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (ok, out) = ledger.audit(&["replay", "--until", &until]).await;
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|line| line.starts_with(&first_id))
        .unwrap();
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        columns[columns.len() - 3..],
        ["300", "active", "3"],
        "{line}"
    );
    assert!(!out.contains(&second.to_string()), "{out}");
    assert!(out.contains("accounts: 1, events folded: 3"), "{out}");
}

#[tokio::test]
async fn a_history_rewritten_after_publication_is_caught_against_kafka() {
    let ledger = Ledger::start().await;
    let rehashed = ledger.account(&[10, 20, 30]).await;
    let truncated = ledger.account(&[5, 6]).await;
    // A transfer's stream (no process manager here: it stays requested, one event).
    let transfer: Uuid = ledger
        .post(
            "/v1/transfers",
            json!({"from_account": rehashed, "to_account": truncated, "amount": 1, "currency": "EUR"}),
        )
        .await["transfer_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    ledger.system.published().await;
    let (ok, out) = ledger.audit(&["verify", "--kafka"]).await;
    assert!(ok, "{out}");
    // Both topics: 7 account events, 1 transfer event.
    assert!(out.contains("messages compared: 7"), "{out}");
    assert!(out.contains("messages compared: 1"), "{out}");
    assert!(out.contains("hash mismatches: 0"), "{out}");
    // One account: only its messages, and not the transfer topic.
    let (ok, out) = ledger
        .audit(&["verify", "--kafka", "--account", &rehashed.to_string()])
        .await;
    assert!(ok, "{out}");
    assert!(out.contains("messages compared: 4"), "{out}");
    assert!(!out.contains("transfer.events"), "{out}");

    // Version 2 rewritten with its hash recomputed as the trigger would: the chain breaks
    // only at version 3; the published hash pins version 2 itself.
    ledger
        .tamper(
            &testing::rewrite_and_rehash(
                2,
                r#"{"MoneyDeposited":{"amount":11,"currency":"EUR","balance_after":11}}"#,
            ),
            rehashed,
        )
        .await;
    // The last event deleted: no chain can tell, the topic can; on either topic.
    ledger
        .tamper(
            "DELETE FROM events WHERE aggregate_id = $1 AND sequence = 3",
            truncated,
        )
        .await;
    ledger
        .tamper("DELETE FROM events WHERE aggregate_id = $1", transfer)
        .await;

    let (ok, out) = ledger.audit(&["verify", "--kafka"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("breaks found: 1"), "{out}");
    assert!(
        out.contains(&format!(
            "account/{rehashed} version 3: previous-hash-mismatch"
        )),
        "{out}"
    );
    assert!(out.contains("hash mismatches: 2"), "{out}");
    let mismatch = |account: Uuid, version: i64| {
        out.lines().any(|line| {
            line.trim_start()
                .starts_with(&format!("account/{account} version {version} (partition"))
        })
    };
    assert!(mismatch(rehashed, 2), "{out}");
    assert!(mismatch(truncated, 3), "{out}");
    assert!(
        out.lines().any(|line| line
            .trim_start()
            .starts_with(&format!("transfer/{transfer} version 1 (partition"))),
        "{out}"
    );
    assert!(out.contains("stored nothing (event missing)"), "{out}");

    let (_, out) = ledger.audit(&["verify", "--kafka", "--sample", "3"]).await;
    assert!(out.contains("messages compared: 3"), "{out}");
}
