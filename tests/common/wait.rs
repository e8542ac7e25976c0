//! Waiting for something to happen in a test: polls with a deadline that
//! only stops a hung test (it asserts nothing about speed).

use std::time::Duration;

/// Calls `check` every 200 ms until it answers `Ok`, and returns that value;
/// panics after `deadline` with `what` and the last `Err` text (what was
/// seen so far).
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let progress = match check().await {
            Ok(done) => return done,
            Err(progress) => progress,
        };
        assert!(
            tokio::time::Instant::now() < until,
            "gave up waiting for {what} after {deadline:?}: {progress}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
