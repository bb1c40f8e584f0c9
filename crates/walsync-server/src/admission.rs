//! Admission of sync streams: at most `server.max_connections` in all, and at most
//! `server.max_streams_per_user` for one user (a buggy or hostile client opening streams in a
//! loop holds its own slots, not everyone's). Write checkpoints are admitted by a rate per user
//! ([`RateLimit`]): each costs a write to PostgreSQL. A refused request is told when to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{ApiError, ErrorCode};

#[derive(Debug)]
pub(crate) struct Admission {
    total: Arc<Semaphore>,
    per_user_limit: usize,
    per_user: Arc<Mutex<HashMap<String, usize>>>,
    retry_after_seconds: u64,
}

/// A stream's place; dropping it (when the stream ends) gives the place back.
#[derive(Debug)]
pub(crate) struct Admitted {
    _total: OwnedSemaphorePermit,
    user: String,
    per_user: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// A refusal, with the seconds after which to retry.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) error: ApiError,
    pub(crate) retry_after_seconds: u64,
}

impl Admission {
    pub(crate) fn new(total: usize, per_user: usize, retry_after_seconds: u64) -> Admission {
        Admission {
            total: Arc::new(Semaphore::new(total)),
            per_user_limit: per_user,
            per_user: Arc::new(Mutex::new(HashMap::new())),
            retry_after_seconds,
        }
    }

    pub(crate) fn admit(&self, user: &str) -> Result<Admitted, Refused> {
        let refuse = |code, message: String| Refused {
            error: ApiError::new(code, message),
            retry_after_seconds: self.retry_after_seconds,
        };
        let Ok(total) = self.total.clone().try_acquire_owned() else {
            return Err(refuse(
                ErrorCode::TooManyConnections,
                "the server holds as many streams as it is configured for; retry later".into(),
            ));
        };
        let mut open = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(user.to_owned()).or_insert(0);
        if *n >= self.per_user_limit {
            return Err(refuse(
                ErrorCode::TooManyStreams,
                format!(
                    "this user has {} open streams, the most server.max_streams_per_user allows; close one or retry later",
                    self.per_user_limit
                ),
            ));
        }
        *n += 1;
        Ok(Admitted {
            _total: total,
            user: user.to_owned(),
            per_user: self.per_user.clone(),
        })
    }
}

/// A token bucket per user: `burst` requests at once, then `per_second`.
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_second: f64,
    burst: f64,
    /// Per user: tokens left and when they were counted.
    users: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Users tracked before the full buckets (users idle long enough) are forgotten: bounds the
/// map whatever the number of users.
const RATE_USERS: usize = 10_000;

impl RateLimit {
    pub(crate) fn new(per_second: f64, burst: u32) -> RateLimit {
        RateLimit {
            per_second: per_second.max(0.001),
            burst: f64::from(burst.max(1)),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token of `user`'s bucket, or says when the next one comes.
    pub(crate) fn admit(&self, user: &str, what: &str) -> Result<(), Refused> {
        let now = Instant::now();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if users.len() >= RATE_USERS && !users.contains_key(user) {
            let (rate, burst) = (self.per_second, self.burst);
            users.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = users.entry(user.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - *tokens) / self.per_second;
        Err(Refused {
            error: ApiError::new(
                ErrorCode::TooManyRequests,
                format!(
                    "this user asked for more than {} {what} per second; retry later",
                    self.per_second
                ),
            ),
            retry_after_seconds: wait.ceil().max(1.0) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_its_burst_then_its_rate() {
        let r = RateLimit::new(0.5, 3);
        for _ in 0..3 {
            r.admit("u1", "write checkpoints")
                .expect("within the burst");
        }
        let refused = r
            .admit("u1", "write checkpoints")
            .expect_err("past the burst");
        assert_eq!(refused.error.code, ErrorCode::TooManyRequests);
        assert_eq!(
            refused.retry_after_seconds, 2,
            "one token every two seconds"
        );
        assert!(
            refused
                .error
                .message
                .contains("0.5 write checkpoints per second")
        );
        r.admit("u2", "write checkpoints")
            .expect("another user has its own");
    }

    #[test]
    fn a_user_holds_at_most_its_share_and_gets_it_back() {
        let a = Admission::new(5, 2, 7);
        let first = a.admit("u1").expect("first");
        let _second = a.admit("u1").expect("second");
        let refused = a.admit("u1").expect_err("third");
        assert_eq!(refused.error.code, ErrorCode::TooManyStreams);
        assert_eq!(refused.retry_after_seconds, 7);
        assert!(refused.error.message.contains("2 open streams"));
        let _other = a.admit("u2").expect("another user");
        drop(first);
        let _again = a.admit("u1").expect("a place came back");
        let _u3 = a.admit("u3").expect("fourth");
        let _u4 = a.admit("u4").expect("fifth");
        let full = a.admit("u5").expect_err("the server is full");
        assert_eq!(full.error.code, ErrorCode::TooManyConnections);
    }
}
