//! Running the system on a developer's machine.

use std::time::Duration;

use anyhow::{Context, bail};
use service_kit::auth::{TokenRequest, mint_hs256};
use service_kit::db::{self, DatabaseConfig, ServiceRole};
use service_kit::{ExposeSecret, SecretString};
use tokio::process::Command;

use crate::broker;
use crate::launch::{self, Launch, Logs, Profile, Running, Service};

/// The HS256 secret `up` gives the services when `JWT_HS256_SECRET` is not set. Development
/// only: production deployments configure their own secret or a public key.
const DEV_JWT_SECRET: &str = "ledger-development-secret-do-not-use-in-production";
const DEV_ISSUER: &str = "ledger";
const DEV_AUDIENCE: &str = "ledger";

fn dev_secret() -> SecretString {
    std::env::var("JWT_HS256_SECRET")
        .unwrap_or_else(|_| DEV_JWT_SECRET.to_owned())
        .into()
}

fn dev_token(
    tenant: &str,
    roles: &[&str],
    subject: &str,
    ttl_seconds: u64,
) -> anyhow::Result<String> {
    let issuer = std::env::var("JWT_ISSUER").unwrap_or_else(|_| DEV_ISSUER.to_owned());
    let audience = std::env::var("JWT_AUDIENCE").unwrap_or_else(|_| DEV_AUDIENCE.to_owned());
    Ok(mint_hs256(
        &dev_secret(),
        &issuer,
        &audience,
        &TokenRequest {
            subject,
            tenant,
            roles,
            ttl_seconds,
        },
    )?)
}

/// `cargo xtask token`: mint a development JWT, signed as `up`'s services expect.
#[derive(clap::Args)]
pub(crate) struct TokenOptions {
    /// The tenant the token is for.
    #[arg(long)]
    tenant: String,
    /// A role to grant (teller, viewer, auditor, admin); repeat for more.
    #[arg(long = "role", value_name = "ROLE", required = true)]
    roles: Vec<String>,
    /// The subject (user) the token names.
    #[arg(long = "sub", value_name = "SUB", default_value = "dev-user")]
    subject: String,
    /// Lifetime in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    ttl: u64,
}

pub(crate) fn token(options: &TokenOptions) -> anyhow::Result<()> {
    let roles: Vec<&str> = options.roles.iter().map(String::as_str).collect();
    println!(
        "{}",
        dev_token(&options.tenant, &roles, &options.subject, options.ttl)?
    );
    Ok(())
}

async fn prepare_database() -> anyhow::Result<DatabaseConfig> {
    let config = DatabaseConfig::from_env()?;
    db::ensure_database_exists(&config).await.context(
        "is Postgres running? Set DATABASE_URL to reach it (default postgres://postgres@127.0.0.1:5432/ledger)",
    )?;
    let pool = db::connect(&config).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    Ok(config)
}

/// The development logins `up` runs the services as: well-known passwords, so only here,
/// never in `migrate`, which may be pointed at a real server.
async fn create_development_logins(database: &DatabaseConfig) -> anyhow::Result<()> {
    let pool = db::connect(database).await?;
    ServiceRole::ensure_development_logins(&pool)
        .await
        .context("creating the services' development logins (needs CREATEROLE)")?;
    pool.close().await;
    Ok(())
}

/// `cargo xtask migrate`
pub(crate) async fn migrate() -> anyhow::Result<()> {
    prepare_database().await?;
    println!("migrations applied");
    Ok(())
}

/// `cargo xtask audit ARGS`: `ledger-audit ARGS` against what `up` runs (its database, its
/// broker), unless `DATABASE_URL` or `KAFKA_BROKERS` say otherwise. It only reads.
pub(crate) async fn audit(args: &[String]) -> anyhow::Result<()> {
    launch::build(Profile::Release, &["audit"]).await?;
    let database = DatabaseConfig::from_env()?;
    let status = Command::new(launch::binary(Profile::Release, "ledger-audit"))
        .args(args)
        .env("DATABASE_URL", database.url.expose_secret())
        .env(
            "KAFKA_BROKERS",
            env_or(
                "KAFKA_BROKERS",
                &env_or("LEDGER_DEV_BROKER_ADDR", DEV_BROKER_ADDR),
            ),
        )
        .status()
        .await
        .context("running ledger-audit")?;
    if !status.success() {
        bail!("ledger-audit exited with {status}");
    }
    Ok(())
}

/// Where `up` starts its broker unless `LEDGER_DEV_BROKER_ADDR` names another address: fixed,
/// so that a consumer set up once keeps working across restarts.
const DEV_BROKER_ADDR: &str = "127.0.0.1:9092";

/// Where `up --oidc` starts the development identity provider unless `LEDGER_DEV_OIDC_PORT`
/// names another port: fixed, so that its issuer (in every token) stays the same across runs.
const DEV_OIDC_PORT: &str = "9400";
/// The development provider's client for machine tokens (`deploy/oidc-dev/server.mjs`).
const DEV_OIDC_CLIENT: (&str, &str) = ("ledger-dev", "ledger-dev-secret");
/// Its public client for Swagger UI's sign-in.
const DEV_OIDC_SWAGGER_CLIENT: &str = "ledger-swagger";

/// `cargo xtask up` options.
#[derive(clap::Args)]
pub(crate) struct UpOptions {
    /// Sign in with a development OpenID Connect provider (deploy/oidc-dev, on 127.0.0.1:9400)
    /// instead of HS256 tokens.
    #[arg(long)]
    oidc: bool,
}

/// How `up`'s services check tokens, and a token they accept.
struct Tokens {
    /// The variables that configure it.
    env: Vec<(&'static str, String)>,
    /// For tenant `dev` with every role.
    token: String,
    /// How to get more, and how to sign in.
    how: String,
    /// The provider, while it runs (killed when dropped).
    _provider: Option<service_kit::dev_provider::DevProvider>,
}

async fn tokens(options: &UpOptions) -> anyhow::Result<Tokens> {
    if !options.oidc {
        return Ok(Tokens {
            env: vec![(
                "JWT_HS256_SECRET",
                dev_secret().expose_secret().to_owned(),
            )],
            token: dev_token(
                "dev",
                &["teller", "viewer", "auditor", "admin"],
                "dev-user",
                86_400,
            )?,
            how: "Dev token (tenant `dev`, all roles, valid 24 h); more: cargo xtask token --tenant T --role teller".into(),
            _provider: None,
        });
    }
    println!("starting the development OpenID Connect provider (npm ci on first use)...");
    let port: u16 = env_or("LEDGER_DEV_OIDC_PORT", DEV_OIDC_PORT)
        .parse()
        .context("LEDGER_DEV_OIDC_PORT")?;
    let provider = service_kit::dev_provider::DevProvider::start(port, &serde_json::json!({}))
        .await
        .context("starting deploy/oidc-dev (needs node and npm)")?;
    let (client, secret) = DEV_OIDC_CLIENT;
    let token = provider
        .token(client, secret, "teller viewer auditor admin")
        .await?;
    let issuer = provider.issuer.clone();
    Ok(Tokens {
        env: vec![
            ("OIDC_ISSUER", issuer.clone()),
            ("OIDC_SWAGGER_CLIENT_ID", DEV_OIDC_SWAGGER_CLIENT.to_owned()),
        ],
        token,
        how: format!(
            "Identity provider {issuer} (oidc-provider). Token from it (tenant `dev`, all roles, valid 10 min); more:\n  \
             curl -s -u {client}:{secret} -d grant_type=client_credentials -d 'scope=teller viewer auditor admin' {issuer}/token\n\
             Swagger UI: open /docs on either API, Authorize, then Authorize under `oidc (OAuth2, authorization_code)`,\n\
             and sign in with any login and password (development interactions)"
        ),
        _provider: Some(provider),
    })
}

/// `cargo xtask up`: everything, in the foreground, until ctrl-c.
pub(crate) async fn up(options: &UpOptions) -> anyhow::Result<()> {
    let tokens = tokens(options).await?;
    let database = prepare_database().await?;
    create_development_logins(&database).await?;
    let (brokers, _broker) = match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) => (brokers, None),
        Err(_) => {
            // Postgres storage, so a restart of `up` keeps what was published.
            let storage = DatabaseConfig::with_url(database_url_named(
                database.url.expose_secret(),
                "ledger_kafka",
            ));
            db::ensure_database_exists(&storage).await?;
            let broker = broker::start_at(
                broker::Storage::Postgres(format!(
                    "{}?sslmode=disable",
                    storage.url.expose_secret()
                )),
                env_or("LEDGER_DEV_BROKER_ADDR", DEV_BROKER_ADDR),
            )
            .await?;
            (broker.address.clone(), Some(broker))
        }
    };
    println!("building the services (release)...");
    launch::build(Profile::Release, &["command-api", "projector", "query-api"]).await?;
    let command_addr = env_or("COMMAND_API_ADDR", "127.0.0.1:8080");
    let query_addr = env_or("QUERY_API_ADDR", "127.0.0.1:8081");
    let command_ops_addr = env_or("COMMAND_API_OPS_ADDR", "127.0.0.1:9080");
    let query_ops_addr = env_or("QUERY_API_OPS_ADDR", "127.0.0.1:9081");
    let projector_addr = env_or("PROJECTOR_ADDR", "127.0.0.1:8082");
    let process_manager_addr = env_or("PROCESS_MANAGER_ADDR", "127.0.0.1:8083");
    // Each service as in production: its own login, with its role's privileges only.
    let service = |which: Service, ops: &str, role: ServiceRole| {
        let mut launch = Launch::service(which, Profile::Release, ops).env(
            "DATABASE_URL",
            role.development_url(database.url.expose_secret()),
        );
        for (name, value) in &tokens.env {
            launch = launch.env(name, value);
        }
        launch
            .env("KAFKA_BROKERS", &brokers)
            .env("COMMAND_API_ADDR", &command_addr)
            .env("QUERY_API_ADDR", &query_addr)
            .env("QUERY_API_PUBLIC_URL", format!("http://{query_addr}"))
            // Idle cheaply: nisshi serves each fetch from its Postgres storage, and at the 10 ms
            // default the two consumers kept it and Postgres at a whole core with no traffic.
            .env("KAFKA_FETCH_WAIT_MS", env_or("KAFKA_FETCH_WAIT_MS", "500"))
            .env("COMMAND_API_OPS_ADDR", &command_ops_addr)
            .env("QUERY_API_OPS_ADDR", &query_ops_addr)
            .env("PROJECTOR_ADDR", &projector_addr)
            .env("PROCESS_MANAGER_ADDR", &process_manager_addr)
            .logs(Logs::Shown)
    };
    let mut services = launch::start(vec![
        service(Service::CommandApi, &command_ops_addr, ServiceRole::Writer),
        service(
            Service::QueryApi,
            &query_ops_addr,
            ServiceRole::TenantReader,
        ),
        service(Service::Projector, &projector_addr, ServiceRole::Projector),
        service(
            Service::ProcessManager,
            &process_manager_addr,
            ServiceRole::Writer,
        ),
    ])
    .await?;
    let commands = format!("http://{command_addr}");
    let queries = format!("http://{query_addr}");
    let command_ops = format!("http://{command_ops_addr}");
    let query_ops = format!("http://{query_ops_addr}");
    let projector = format!("http://{projector_addr}");
    let process_manager = format!("http://{process_manager_addr}");
    let token = &tokens.token;
    let how = &tokens.how;
    println!(
        "\nLedger is running.\n\n  command API   {commands}   (OpenAPI {commands}/openapi.json, Swagger UI {commands}/docs)\n  \
         query API     {queries}   (OpenAPI {queries}/openapi.json, Swagger UI {queries}/docs)\n  \
         ops           command API {command_ops}, query API {query_ops}, projector {projector}, process manager {process_manager}\n                \
         (each: /metrics, /health/live, /health/ready; never on the APIs' public ports)\n  \
         Kafka         {brokers}   (topics ledger.account.events, ledger.transfer.events, ledger.deadletter)\n  Postgres      {}\n\n\
         {how}:\n\n  export TOKEN={token}\n\n\
         Try:\n  curl -s -X POST {commands}/v1/accounts -H \"Authorization: Bearer $TOKEN\" \\\n    -H 'Content-Type: application/json' -d '{{\"owner\":\"Ada\",\"currency\":\"EUR\"}}'\n  \
         curl -s {queries}/v1/accounts -H \"Authorization: Bearer $TOKEN\"\n  \
         curl -s -X POST {commands}/v1/transfers -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n    \
         -d '{{\"from_account\":\"<id>\",\"to_account\":\"<id>\",\"amount\":500,\"currency\":\"EUR\"}}'\n\n\
         Audit: cargo xtask audit verify --kafka\nPress ctrl-c to stop.\n",
        redact(database.url.expose_secret())
    );
    if let Some((service, status)) = first_exit(&mut services).await {
        eprintln!("{service} exited ({status}); stopping the others");
    }
    launch::stop(&mut services).await;
    Ok(())
}

/// Waits for ctrl-c (`None`) or for a service to exit (its name and status), whichever comes
/// first.
async fn first_exit(services: &mut [Running]) -> Option<(String, std::process::ExitStatus)> {
    loop {
        for service in services.iter_mut() {
            if let Ok(Some(status)) = service.exited() {
                return Some((service.label().to_owned(), status));
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return None,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// `url` with its database name replaced by `name`.
fn database_url_named(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = base.rsplit_once('/').map_or(base, |(head, _)| head);
    if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    }
}

/// The URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if url[scheme + 3..at].contains(':') => {
            let user_end = scheme + 3 + url[scheme + 3..at].find(':').unwrap_or(0);
            format!("{}:***{}", &url[..user_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}
