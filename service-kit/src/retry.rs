//! The one backoff policy of every loop that retries until the database or the broker is back
//! (the relay, the projector, the process manager): 100 ms, doubling, at most 5 s between
//! tries, never giving up.
//!
//! `backon` computes the pauses and runs the retries: a maintained crate and one way of
//! writing a retry, instead of a hand-rolled backoff loop in each place.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

/// The first pause after a failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest pause between two tries.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// Exponential backoff from [`FIRST_DELAY`] to [`MAX_DELAY`], without jitter and without a
/// limit on the number of tries: what these loops hold must not be dropped.
pub fn policy() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(FIRST_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .without_max_times()
}

/// Runs `attempt` until it succeeds, pausing after each failure as [`policy`] says;
/// `failed` hears of each failure and of the pause before the next try.
pub async fn until_ok<T, E, Fut>(
    mut attempt: impl FnMut() -> Fut,
    mut failed: impl FnMut(&E, Duration),
) -> T
where
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        // The policy never gives up, so this returns with a success; were it ever to give
        // up, the tries would start over rather than lose the work.
        if let Ok(value) = (&mut attempt).retry(policy()).notify(&mut failed).await {
            return value;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use backon::BackoffBuilder;

    use super::*;

    #[test]
    fn doubles_from_a_tenth_of_a_second_up_to_five_seconds_forever() {
        let millis: Vec<u128> = policy()
            .build()
            .take(10)
            .map(|pause| pause.as_millis())
            .collect();
        assert_eq!(
            millis,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        assert!(policy().build().nth(100_000).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_attempt_succeeds() {
        let tries = Cell::new(0);
        let mut pauses = Vec::new();
        let value = until_ok(
            || {
                tries.set(tries.get() + 1);
                let ok = tries.get() == 4;
                async move { if ok { Ok("done") } else { Err("down") } }
            },
            |err, pause| pauses.push((*err, pause.as_millis())),
        )
        .await;
        assert_eq!(value, "done");
        assert_eq!(pauses, [("down", 100), ("down", 200), ("down", 400)]);
    }
}
