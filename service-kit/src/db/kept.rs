//! Connections kept out of sqlx's pool between uses, for paths that send one statement per use
//! and run hot: the query API's account reads.
//!
//! sqlx pings a connection each time it goes back to its pool (a Sync and the ReadyForQuery it
//! answers, in `PoolConnection`'s release), and 0.8 has no setting to turn that off: on a `PgPool`,
//! a one-statement use costs two round trips and wakes its Postgres backend twice. A connection
//! kept here goes back without a ping. [deadpool] does the keeping: sqlx's pool stays the one
//! place connections are opened and configured, and a kept connection is one taken from it,
//! counted towards its size, so `DATABASE_MAX_CONNECTIONS` still bounds the process.
//!
//! The ping's work is done where it matters: a use that did not finish (its future dropped
//! mid-statement) or that failed other than by Postgres refusing the statement hands its
//! connection back to sqlx's pool, whose ping closes it if it is broken, and the idle kept ones
//! with it; a connection is pinged when it is taken from the pool, and a kept one idle for
//! longer than [`PING_IF_IDLE_FOR`] before it is used again, as sqlx's pool does here
//! (`pool_options`).
//!
//! Connections kept [`KeptConnections::acting_as`] a role take it for their session once, when
//! they are taken from the pool, and wherever the others go back to sqlx's pool they are closed
//! instead: the pool's other users expect the login's own role, and a connection cut off
//! mid-statement cannot be trusted to have switched back. The price is a new connection (and
//! a Postgres backend) after each unfinished or broken use, where the others cost a ping.

use std::ops::{Deref, DerefMut};

use deadpool::managed::{self, Metrics, Object, QueueMode, RecycleResult};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgDatabaseError, PgSeverity};
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use super::PING_IF_IDLE_FOR;

/// Up to `size` connections taken from a `PgPool` and kept out of it between uses.
#[derive(Clone)]
pub struct KeptConnections(managed::Pool<FromPool>);

/// Takes the kept connections from sqlx's pool.
struct FromPool {
    pool: PgPool,
    /// The role the connections take for their session, if not the login's.
    role: Option<&'static str>,
}

impl managed::Manager for FromPool {
    type Type = PoolConnection<Postgres>;
    type Error = sqlx::Error;

    /// A connection from the pool, pinged first (by taking the role, if there is one): the
    /// pool hands out one used less than [`PING_IF_IDLE_FOR`] ago unchecked, and it may have
    /// been cut since (Postgres restarting cuts them all). A broken one is closed and the next
    /// taken, as many times as the pool has connections. A refusal that leaves the session
    /// open (the login may not take the role) is returned at once: the next connection would
    /// be refused too.
    async fn create(&self) -> Result<Self::Type, sqlx::Error> {
        let mut tries = self.pool.options().get_max_connections();
        loop {
            let mut connection = self.pool.acquire().await?;
            let checked = match self.role {
                None => connection.ping().await,
                Some(role) => {
                    // Before the await: a caller giving up mid-statement drops it here.
                    connection.close_on_drop();
                    sqlx::query("SELECT set_config('role', $1, false)")
                        .bind(role)
                        .execute(&mut *connection)
                        .await
                        .map(drop)
                }
            };
            match checked {
                Ok(()) => return Ok(connection),
                Err(sqlx::Error::Database(err)) if !ends_the_session(err.as_ref()) => {
                    return Err(sqlx::Error::Database(err));
                }
                Err(err) if tries == 0 => return Err(err),
                Err(_) => {
                    connection.close_on_drop();
                    tries -= 1;
                }
            }
        }
    }

    async fn recycle(
        &self,
        connection: &mut Self::Type,
        metrics: &Metrics,
    ) -> RecycleResult<sqlx::Error> {
        if metrics.last_used() > PING_IF_IDLE_FOR {
            connection.ping().await?;
        }
        Ok(())
    }
}

impl KeptConnections {
    /// Keeps up to `size` of `pool`'s connections, but never more than half of them when it
    /// has more than one: the rest stay in `pool` for everything else (a kept connection counts
    /// as in use there). A wait for a kept connection is bounded by the pool's acquire timeout.
    pub fn new(pool: PgPool, size: usize) -> Self {
        Self::keep(FromPool { pool, role: None }, size)
    }

    /// As [`KeptConnections::new`], with each connection acting as `role` for its session (the
    /// login must be a member of it, or a superuser). A connection leaves the kept ones closed,
    /// never back in `pool`.
    pub fn acting_as(pool: PgPool, size: usize, role: &'static str) -> Self {
        Self::keep(
            FromPool {
                pool,
                role: Some(role),
            },
            size,
        )
    }

    fn keep(manager: FromPool, size: usize) -> Self {
        let options = manager.pool.options();
        let size = size.min(options.get_max_connections() as usize / 2).max(1);
        let wait = options.get_acquire_timeout();
        let kept = managed::Pool::builder(manager)
            .max_size(size)
            // The connection used last is the one most likely still in Postgres's caches, and
            // the others go idle (and are pinged if used again) instead of taking turns.
            .queue_mode(QueueMode::Lifo)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(wait))
            .build()
            .expect("a runtime is set for the wait timeout");
        Self(kept)
    }

    /// How many kept connections wait for their next use.
    pub fn idle(&self) -> usize {
        self.0.status().available
    }

    /// A connection for one use; see [`Kept::keep_if_usable`].
    pub async fn get(&self) -> Result<Kept, sqlx::Error> {
        match self.0.get().await {
            Ok(connection) => Ok(Kept(Some(connection))),
            Err(managed::PoolError::Backend(err)) => Err(err),
            Err(managed::PoolError::Closed) => Err(sqlx::Error::PoolClosed),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }
}

/// A kept connection in use. Dropped without [`Kept::keep_if_usable`], it goes back to
/// sqlx's pool (and its ping), or is closed if it acts as a role, not to the kept ones: the use
/// may have stopped mid-statement.
pub struct Kept(Option<Object<FromPool>>);

impl Kept {
    /// Ends the use whose outcome is `outcome`: the connection is kept for the next use if the
    /// use succeeded or Postgres refused the statement without closing the session (the
    /// connection is then in step with the server), and goes back to sqlx's pool (or is
    /// closed, as above) otherwise. So do the idle kept ones then: what cut this connection
    /// (Postgres restarting, the network) may have cut them too, and one used less than
    /// [`PING_IF_IDLE_FOR`] ago would be handed out without a ping.
    pub fn keep_if_usable<T>(mut self, outcome: &Result<T, sqlx::Error>) {
        match outcome {
            Ok(_) => drop(self.0.take()),
            Err(sqlx::Error::Database(err)) if !ends_the_session(err.as_ref()) => {
                drop(self.0.take())
            }
            Err(_) => {
                if let Some(kept) = self.0.as_ref().and_then(Object::pool) {
                    drop(kept.retain(|_, _| false));
                }
            }
        }
    }
}

/// Whether Postgres closed the session with `err` (FATAL or PANIC: a terminated backend's
/// last words, read by the next statement sent to it).
fn ends_the_session(err: &dyn sqlx::error::DatabaseError) -> bool {
    err.try_downcast_ref::<PgDatabaseError>()
        .is_some_and(|err| matches!(err.severity(), PgSeverity::Fatal | PgSeverity::Panic))
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            drop(Object::take(connection));
        }
    }
}

impl Deref for Kept {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.0.as_ref().expect("present until dropped")
    }
}

impl DerefMut for Kept {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0.as_mut().expect("present until dropped")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::db::{DatabaseConfig, TENANT_READER_ROLE, connect};
    use crate::testing::TestDatabase;

    /// A pool of `max_connections` on `database`, whose waits end soon.
    async fn pool_of(database: &TestDatabase, max_connections: u32) -> PgPool {
        connect(&DatabaseConfig {
            max_connections,
            acquire_timeout: Duration::from_millis(500),
            ..database.config.clone()
        })
        .await
        .unwrap()
    }

    /// A pool of one connection, and up to that one kept from it.
    async fn one_connection(database: &TestDatabase) -> (PgPool, KeptConnections) {
        let pool = pool_of(database, 1).await;
        let kept = KeptConnections::new(pool.clone(), 1);
        (pool, kept)
    }

    async fn backend(kept: &KeptConnections) -> i32 {
        let mut connection = kept.get().await.unwrap();
        let backend = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *connection)
            .await;
        connection.keep_if_usable(&backend);
        backend.unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_kept_out_of_the_pool_between_uses() {
        let database = TestDatabase::create().await;
        let (pool, kept) = one_connection(&database).await;
        let first = backend(&kept).await;
        assert!(
            matches!(pool.acquire().await, Err(sqlx::Error::PoolTimedOut)),
            "the pool's one connection went back to it"
        );
        assert_eq!(backend(&kept).await, first);

        let mut connection = kept.get().await.unwrap();
        let refused = sqlx::query("SELECT 1 / 0").execute(&mut *connection).await;
        assert!(matches!(refused, Err(sqlx::Error::Database(_))));
        connection.keep_if_usable(&refused);
        assert_eq!(
            backend(&kept).await,
            first,
            "a refused statement cost the connection"
        );
    }

    #[tokio::test]
    async fn the_pool_keeps_half_its_connections_for_everything_else() {
        let database = TestDatabase::create().await;
        let pool = pool_of(&database, 4).await;
        let kept = KeptConnections::new(pool.clone(), 4);
        let _in_use = (kept.get().await.unwrap(), kept.get().await.unwrap());
        assert!(matches!(kept.get().await, Err(sqlx::Error::PoolTimedOut)));
        let _others = (
            pool.acquire()
                .await
                .expect("all but one connection were kept"),
            pool.acquire().await.expect("more than half were kept"),
        );
    }

    #[tokio::test]
    async fn a_use_that_did_not_finish_hands_its_connection_back_to_the_pool() {
        let database = TestDatabase::create().await;
        let (pool, kept) = one_connection(&database).await;
        let connection = kept.get().await.unwrap();
        drop(connection);
        let returned = pool
            .acquire()
            .await
            .expect("the connection went back to the pool");
        drop(returned);
        backend(&kept).await;
    }

    async fn current_user(connection: &mut PgConnection) -> String {
        sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(connection)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_acting_as_a_role_keeps_it_and_leaves_closed() {
        let database = TestDatabase::create().await;
        let pool = pool_of(&database, 1).await;
        let login = current_user(&mut pool.acquire().await.unwrap()).await;
        assert_ne!(login, TENANT_READER_ROLE);
        let kept = KeptConnections::acting_as(pool.clone(), 1, TENANT_READER_ROLE);
        let mut uses = Vec::new();
        for _ in 0..2 {
            let mut connection = kept.get().await.unwrap();
            let used =
                sqlx::query_as::<_, (String, i32)>("SELECT current_user::text, pg_backend_pid()")
                    .fetch_one(&mut *connection)
                    .await;
            connection.keep_if_usable(&used);
            uses.push(used.unwrap());
        }
        assert_eq!(uses[0].0, TENANT_READER_ROLE);
        assert_eq!(uses[0], uses[1], "one session, kept with its role");

        // A use that did not finish: the connection leaves the kept ones, and the pool's next
        // one is the login's own.
        drop(kept.get().await.unwrap());
        let mut next = pool.acquire().await.expect("the pool has a connection");
        assert_eq!(current_user(&mut next).await, login);
    }

    #[tokio::test]
    async fn a_failed_use_sends_the_idle_kept_connections_back_to_the_pool() {
        let database = TestDatabase::create().await;
        let kept = KeptConnections::new(pool_of(&database, 4).await, 2);
        // Two connections in use at once, so two are kept, idle, after.
        let (first, second) = (kept.get().await.unwrap(), kept.get().await.unwrap());
        let mut cut = Vec::new();
        for mut connection in [first, second] {
            let backend = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(&mut *connection)
                .await;
            connection.keep_if_usable(&backend);
            cut.push(backend.unwrap());
        }
        database.cut_backends(&cut).await;

        let mut connection = kept.get().await.unwrap();
        let failed = sqlx::query("SELECT 1").execute(&mut *connection).await;
        assert!(failed.is_err(), "a cut connection answered");
        connection.keep_if_usable(&failed);
        let replacement = backend(&kept).await;
        assert!(
            !cut.contains(&replacement),
            "a cut connection was handed out"
        );
    }

    #[tokio::test]
    async fn a_kept_connection_cut_while_idle_is_replaced_not_handed_out() {
        let database = TestDatabase::create().await;
        let (_pool, kept) = one_connection(&database).await;
        let cut = backend(&kept).await;
        database.cut_backends(&[cut]).await;
        tokio::time::sleep(PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
        assert_ne!(backend(&kept).await, cut);
    }
}
