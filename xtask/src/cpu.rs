//! CPU time the benchmarks charge to each unit of work, from `/proc`: one service process, and
//! Postgres as a whole ([`Watched`]); named processes and the whole machine ([`Sample`]). On a
//! shared 2-core machine this is steadier than a rate.

use anyhow::Context;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
pub(crate) const TICKS_PER_SECOND: f64 = 100.0;

/// How long a backend takes at most to exit and be reaped once its client has disconnected.
const BACKENDS_GONE_WITHIN: std::time::Duration = std::time::Duration::from_millis(250);

/// The processes whose CPU time is counted.
pub(crate) struct Watched {
    service: u32,
    postmaster: u32,
}

/// Ticks spent: by the service, by Postgres, and by the whole machine.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ticks {
    pub(crate) service: u64,
    pub(crate) postgres: u64,
    pub(crate) busy: u64,
}

impl Ticks {
    /// What was spent between `earlier` and `self`.
    pub(crate) fn since(self, earlier: Ticks) -> Ticks {
        Ticks {
            service: self.service - earlier.service,
            postgres: self.postgres - earlier.postgres,
            busy: self.busy - earlier.busy,
        }
    }

    /// CPU microseconds per operation of `ticks`, over `operations`.
    pub(crate) fn micros_per_op(ticks: u64, operations: usize) -> f64 {
        ticks as f64 / TICKS_PER_SECOND * 1e6 / operations.max(1) as f64
    }
}

impl Watched {
    /// The service `service` and the Postgres server `database` is connected to, which must
    /// run on this machine.
    pub(crate) async fn new(service: u32, database: &sqlx::PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            service,
            postmaster: postmaster_pid(database).await?,
        })
    }

    /// Watches another service process on the same Postgres.
    pub(crate) fn with_service(&self, service: u32) -> Self {
        Self {
            service,
            postmaster: self.postmaster,
        }
    }

    /// Runs `load`, and what it cost from its start until its backends had gone.
    pub(crate) async fn around<T>(
        &self,
        load: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<(T, Ticks)> {
        let before = self.sample()?;
        let done = load.await?;
        Ok((done, self.sample_after_load().await?.since(before)))
    }

    /// [`Watched::sample`] once the backends of a load that just ended have gone: a backend
    /// read neither while it exits nor, not yet reaped, in its postmaster's children's times
    /// would be missed (with pgbench at 1 client, all of its work).
    pub(crate) async fn sample_after_load(&self) -> anyhow::Result<Ticks> {
        tokio::time::sleep(BACKENDS_GONE_WITHIN).await;
        self.sample()
    }

    /// Ticks used so far by the service and by Postgres: the postmaster's own and its reaped
    /// children's (`cutime`, `cstime`: backends that ended, pgbench's among them), plus each
    /// running child's; and the machine's busy ticks.
    pub(crate) fn sample(&self) -> anyhow::Result<Ticks> {
        let service = process_ticks(self.service)?;
        let mut postgres = {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.postmaster))?;
            ticks(&stat_fields(&stat)?, &[11, 12, 13, 14])?
        };
        let parent = self.postmaster.to_string();
        for entry in std::fs::read_dir("/proc")? {
            let path = entry?.path();
            let is_pid = path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()));
            // A process that ends now is missed: it is read neither here nor in the
            // postmaster's children's times, read above ([`Watched::sample_after_load`]).
            let Some(stat) = is_pid
                .then(|| std::fs::read_to_string(path.join("stat")).ok())
                .flatten()
            else {
                continue;
            };
            let fields = stat_fields(&stat)?;
            if fields.get(1) == Some(&parent.as_str()) {
                postgres += ticks(&fields, &[11, 12])?;
            }
        }
        Ok(Ticks {
            service,
            postgres,
            busy: crate::bench::machine_busy_ticks()?,
        })
    }
}

/// CPU time used so far, in ticks: the machine's busy time, and each named process's.
pub(crate) struct Sample {
    at: std::time::Instant,
    busy: u64,
    processes: Vec<(String, u64)>,
}

/// CPU used between two [`Sample`]s.
pub(crate) struct Spent {
    pub(crate) elapsed: std::time::Duration,
    pub(crate) busy: u64,
    pub(crate) processes: Vec<(String, u64)>,
}

impl Sample {
    pub(crate) fn take(processes: &[(String, u32)]) -> anyhow::Result<Self> {
        let busy = crate::bench::machine_busy_ticks()?;
        let mut sampled = Vec::new();
        for (label, pid) in processes {
            sampled.push((label.clone(), process_ticks(*pid)?));
        }
        Ok(Self {
            at: std::time::Instant::now(),
            busy,
            processes: sampled,
        })
    }

    pub(crate) fn since(&self, earlier: &Self) -> Spent {
        Spent {
            elapsed: self.at.duration_since(earlier.at),
            busy: self.busy - earlier.busy,
            processes: self
                .processes
                .iter()
                .zip(&earlier.processes)
                .map(|((label, now), (_, then))| (label.clone(), now - then))
                .collect(),
        }
    }
}

impl Spent {
    pub(crate) fn cores(&self, ticks: u64) -> f64 {
        ticks as f64 / TICKS_PER_SECOND / self.elapsed.as_secs_f64()
    }

    /// The whole machine's busy cores.
    pub(crate) fn machine_cores(&self) -> f64 {
        self.cores(self.busy)
    }
}

/// Ticks a running process has used so far, in user and system mode (`utime`, `stime`).
pub(crate) fn process_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    ticks(&stat_fields(&stat)?, &[11, 12])
}

/// The sum of `fields` at `at`. After the command name: state (0), ppid (1), ..., utime (11),
/// stime (12), cutime (13), cstime (14).
fn ticks(fields: &[&str], at: &[usize]) -> anyhow::Result<u64> {
    at.iter()
        .map(|&i| Ok(fields.get(i).context("/proc/<pid>/stat")?.parse::<u64>()?))
        .sum()
}

/// The postmaster, whose children are every Postgres process: the parent of a backend.
async fn postmaster_pid(database: &sqlx::PgPool) -> anyhow::Result<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(database)
        .await?;
    let stat = std::fs::read_to_string(format!("/proc/{backend}/stat"))
        .context("Postgres must run on this machine, visible in /proc")?;
    Ok(stat_fields(&stat)?[1].parse()?)
}

/// The fields of `/proc/<pid>/stat` after the command name, which is in parentheses and may
/// hold spaces.
fn stat_fields(stat: &str) -> anyhow::Result<Vec<&str>> {
    Ok(stat
        .rsplit_once(')')
        .context("/proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect())
}
