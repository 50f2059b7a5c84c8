//! `cargo xtask fuzz`: schema-driven HTTP fuzzing of both APIs from their own OpenAPI
//! documents, with schemathesis (from the project's venv, see `python`), against the real
//! services on a scratch database. Every check is on (no 5xx, every response as documented,
//! problem+json errors, invalid input refused) except `positive_data_acceptance`: the domain
//! refuses some schema-valid requests on purpose (an account that does not exist, a transfer
//! to the same account). Exits non-zero if either API fails a check, or if schemathesis
//! itself failed (its report's "errors": a crash of the tool, a network error), which is said
//! as such: that is no verdict on the API. `.ci/run` runs a short pass with a fixed seed.

use std::path::Path;

use anyhow::{Context, bail};
use service_kit::ExposeSecret;
use service_kit::db::{self, DatabaseConfig};
use tokio::process::Command;

use crate::bench::service_token;
use crate::dev::workspace_root;
use crate::launch::{self, Launch, Profile, Service, free_address};

const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789abcdef";

/// `cargo xtask fuzz`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Examples schemathesis generates per operation.
    #[arg(long, value_name = "N", default_value_t = 50)]
    examples: u32,
    /// Seed of the generated requests, to repeat a run exactly; random when not given.
    #[arg(long, value_name = "SEED")]
    seed: Option<u64>,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    crate::python::ensure_tools().await?;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ledger_fuzz".into());
    let database = DatabaseConfig::with_url(&url);
    db::ensure_database_exists(&database).await?;
    let pool = db::connect(&database).await?;
    db::migrate(&pool).await?;
    pool.close().await;

    launch::build(Profile::Debug, &["command-api", "query-api"]).await?;
    let (command_addr, query_addr) = (free_address()?, free_address()?);
    let service = |which: Service| -> anyhow::Result<Launch> {
        Ok(Launch::service(which, Profile::Debug, &free_address()?)
            .env("DATABASE_URL", database.url.expose_secret())
            .env("JWT_HS256_SECRET", SECRET)
            .env("COMMAND_API_RELAY", "false")
            .env("COMMAND_API_ADDR", &command_addr)
            .env("QUERY_API_ADDR", &query_addr)
            .env("RUST_LOG", "warn"))
    };
    let mut services = launch::start(vec![
        service(Service::CommandApi)?,
        service(Service::QueryApi)?,
    ])
    .await?;
    let apis = [
        ("command API", format!("http://{command_addr}")),
        ("query API", format!("http://{query_addr}")),
    ];
    let token = service_token(SECRET, "fuzz", "fuzzer", &["teller", "viewer", "auditor"])?;
    let config = workspace_root().join("xtask/fuzz/schemathesis.toml");
    let mut outcomes = Vec::new();
    for (name, base) in &apis {
        println!("\n==> {name}: {base}/openapi.json");
        let mut schemathesis = Command::new(crate::python::bin().join("schemathesis"));
        schemathesis
            .arg("--config-file")
            .arg(&config)
            .args(["run", &format!("{base}/openapi.json")])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args([
                "--max-examples",
                &options.examples.to_string(),
                "--workers",
                "2",
            ]);
        if let Some(seed) = options.seed {
            schemathesis.args(["--seed", &seed.to_string()]);
        }
        let report = workspace_root()
            .join("target/fuzz")
            .join(format!("{}.json", name.replace(' ', "-")));
        outcomes.push((*name, fuzz(schemathesis, &report).await));
    }
    launch::stop(&mut services).await;
    let mut verdicts = Vec::new();
    for (name, outcome) in outcomes {
        let outcome = outcome?;
        println!("\n{name}: {}", outcome.summary());
        verdicts.push((name, outcome));
    }
    let api_failed: Vec<&str> = verdicts
        .iter()
        .filter(|(_, outcome)| !outcome.failures.is_empty())
        .map(|(name, _)| *name)
        .collect();
    if !api_failed.is_empty() {
        bail!(
            "schemathesis found failures in the {}",
            api_failed.join(" and the ")
        );
    }
    let tool_failed: Vec<&str> = verdicts
        .iter()
        .filter(|(_, outcome)| !outcome.errors.is_empty())
        .map(|(name, _)| *name)
        .collect();
    if !tool_failed.is_empty() {
        bail!(
            "schemathesis itself failed on the {} (see its errors above): no verdict on the API",
            tool_failed.join(" and the ")
        );
    }
    println!("\nno failures in either API");
    Ok(())
}

/// What one schemathesis run found, from its JSON report.
#[derive(Debug)]
struct Outcome {
    /// Checks the API failed, e.g. `ST101 Server error (3)`.
    failures: Vec<String>,
    /// What kept schemathesis from testing: its own crash (`Runtime Error`), a network error,
    /// or no report at all.
    errors: Vec<String>,
}

impl Outcome {
    fn summary(&self) -> String {
        match (self.failures.is_empty(), self.errors.is_empty()) {
            (true, true) => "every check passed".to_owned(),
            (false, true) => format!("the API failed checks: {}", self.failures.join(", ")),
            (true, false) => format!(
                "schemathesis itself failed, not the API: {}",
                self.errors.join(", ")
            ),
            (false, false) => format!(
                "the API failed checks: {}; and schemathesis itself failed: {}",
                self.failures.join(", "),
                self.errors.join(", ")
            ),
        }
    }
}

/// Runs `schemathesis` (a `run` command, all but its report) with its JSON report at
/// `report`, and reads the report: the exit code is 1 both when the API fails a check and
/// when the tool crashes, the report tells them apart.
async fn fuzz(mut schemathesis: Command, report: &Path) -> anyhow::Result<Outcome> {
    if report.exists() {
        std::fs::remove_file(report)?;
    }
    // Schemathesis and hypothesis keep their caches in the working directory: under target/.
    let scratch = workspace_root().join("target/fuzz");
    std::fs::create_dir_all(&scratch)?;
    let status = schemathesis
        .current_dir(&scratch)
        .arg("--report-json-path")
        .arg(report)
        .status()
        .await
        .context("running schemathesis")?;
    let Ok(text) = std::fs::read_to_string(report) else {
        return Ok(Outcome {
            failures: Vec::new(),
            errors: vec![format!("schemathesis exited ({status}) without a report")],
        });
    };
    let report: serde_json::Value =
        serde_json::from_str(&text).context("reading schemathesis's JSON report")?;
    let entries = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| {
                let code = entry["code"].as_str().map(|code| format!("{code} "));
                format!(
                    "{}{} ({})",
                    code.unwrap_or_default(),
                    entry["title"].as_str().unwrap_or("?"),
                    entry["count"]
                )
            })
            .collect()
    };
    let mut outcome = Outcome {
        failures: entries("failures"),
        errors: entries("errors"),
    };
    if !status.success() && outcome.failures.is_empty() && outcome.errors.is_empty() {
        outcome.errors.push(format!(
            "schemathesis exited ({status}) with neither failures nor errors in its report"
        ));
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::get;
    use serde_json::json;

    use super::*;

    /// An API of one operation, `GET /thing`, documented to answer 200 with a JSON object,
    /// that answers `status`.
    async fn api(status: StatusCode) -> String {
        let openapi = json!({
            "openapi": "3.1.0",
            "info": {"title": "stub", "version": "1"},
            "paths": {"/thing": {"get": {"responses": {"200": {
                "description": "the thing",
                "content": {"application/json": {"schema": {"type": "object"}}}
            }}}}}
        });
        let router = Router::new()
            .route(
                "/openapi.json",
                get(move || async move { axum::Json(openapi) }),
            )
            .route(
                "/thing",
                get(move || async move { (status, axum::Json(json!({}))) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{address}/openapi.json")
    }

    /// Schemathesis from the project's venv (`cargo xtask test` installs it), a short
    /// deterministic run.
    fn schemathesis(openapi: &str) -> Command {
        let bin = crate::python::bin().join("schemathesis");
        assert!(
            bin.exists(),
            "{} is missing: run the tests with `cargo xtask test`",
            bin.display()
        );
        let mut command = Command::new(bin);
        command.args([
            "run",
            openapi,
            "--phases",
            "fuzzing",
            "--max-examples",
            "5",
            "--seed",
            "1",
        ]);
        command
    }

    fn report(name: &str) -> std::path::PathBuf {
        let dir = workspace_root().join("target/fuzz-tests");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{name}-{}.json", std::process::id()))
    }

    #[tokio::test]
    async fn an_api_that_fails_a_check_is_the_apis_failure() {
        let openapi = api(StatusCode::INTERNAL_SERVER_ERROR).await;
        let outcome = fuzz(schemathesis(&openapi), &report("failing"))
            .await
            .unwrap();
        assert!(
            outcome.failures.iter().any(|f| f.starts_with("ST101 ")),
            "{outcome:?}"
        );
        assert!(outcome.errors.is_empty(), "{outcome:?}");
        assert!(
            outcome.summary().starts_with("the API failed checks: "),
            "{}",
            outcome.summary()
        );
    }

    /// The crash that once passed for an API failure: hypothesis raising `SystemError` inside
    /// Python 3.11.7, injected here through `sitecustomize`, which Python imports at start-up.
    #[tokio::test]
    async fn a_crash_of_schemathesis_is_not_the_apis_failure() {
        let openapi = api(StatusCode::OK).await;
        let site = workspace_root().join("target/fuzz-tests/crash");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(
            site.join("sitecustomize.py"),
            "import hypothesis.core\n\
             def crash(*args, **kwargs):\n    \
                 raise SystemError('AST constructor recursion depth mismatch')\n\
             hypothesis.core.StateForActualGivenExecution.execute_once = crash\n",
        )
        .unwrap();
        let mut schemathesis = schemathesis(&openapi);
        schemathesis.env("PYTHONPATH", &site);
        let outcome = fuzz(schemathesis, &report("crashing")).await.unwrap();
        assert!(outcome.failures.is_empty(), "{outcome:?}");
        assert!(
            outcome
                .errors
                .iter()
                .any(|e| e.starts_with("Runtime Error")),
            "{outcome:?}"
        );
        assert!(
            outcome
                .summary()
                .starts_with("schemathesis itself failed, not the API: "),
            "{}",
            outcome.summary()
        );
    }

    #[tokio::test]
    async fn a_run_without_a_report_is_schemathesis_failing() {
        let outcome = fuzz(
            schemathesis("no-such-openapi-document.json"),
            &report("unreadable"),
        )
        .await
        .unwrap();
        assert!(outcome.failures.is_empty(), "{outcome:?}");
        assert!(!outcome.errors.is_empty(), "{outcome:?}");
    }
}
