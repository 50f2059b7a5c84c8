//! A one-line progress bar on stderr for long command-line jobs (rebuild, verify, export).
//! `indicatif` draws it (rate and estimate included), and only when stderr is a terminal, so
//! logs and CI output stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress(ProgressBar);

impl Progress {
    /// A bar for `total` units of `label` (e.g. "events"), shown if `wanted` and stderr is a
    /// terminal.
    pub fn new(label: &'static str, total: u64, wanted: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if wanted {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        if let Ok(style) = ProgressStyle::with_template(&format!(
            "[{{bar:40}}] {{pos}}/{{len}} {label}, {{per_sec}}, {{eta}} left"
        )) {
            bar.set_style(style.progress_chars("#>-"));
        }
        Self(bar)
    }

    pub fn update(&self, done: u64) {
        self.0.set_position(done);
    }

    /// Draws the final state and ends the line.
    pub fn finish(&self, done: u64) {
        self.0.set_position(done);
        self.0.finish();
    }
}
