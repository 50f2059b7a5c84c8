//! A one-line progress bar on stderr for long command-line jobs (rebuild, verify, export).
//! Draws only when stderr is a terminal, so logs and CI output stay clean.

use std::io::{IsTerminal, Write};
use std::time::Instant;

const WIDTH: u64 = 40;

pub struct Progress {
    label: &'static str,
    total: u64,
    started: Instant,
    enabled: bool,
}

impl Progress {
    /// A bar for `total` units of `label` (e.g. "events"), shown if `wanted` and stderr is a
    /// terminal.
    pub fn new(label: &'static str, total: u64, wanted: bool) -> Self {
        Self {
            label,
            total: total.max(1),
            started: Instant::now(),
            enabled: wanted && std::io::stderr().is_terminal(),
        }
    }

    #[allow(clippy::print_stderr)]
    pub fn update(&self, done: u64) {
        if !self.enabled {
            return;
        }
        let filled = done.min(self.total) * WIDTH / self.total;
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r[{}{}] {done}/{} {}, {rate:.0}/s",
            "#".repeat(filled as usize),
            " ".repeat((WIDTH - filled) as usize),
            self.total,
            self.label,
        );
        let _ = std::io::stderr().flush();
    }

    /// Draws the final state and ends the line.
    #[allow(clippy::print_stderr)]
    pub fn finish(&self, done: u64) {
        if self.enabled {
            self.update(done);
            eprintln!();
        }
    }
}
