//! Admission of sync streams: at most `server.max_connections` in all, and at most
//! `server.max_streams_per_user` for one user (a buggy or hostile client opening streams in a
//! loop holds its own slots, not everyone's). A refused stream is told when to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;

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
