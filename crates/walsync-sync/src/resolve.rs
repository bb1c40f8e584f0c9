//! A request's buckets at a checkpoint: those that follow from the request alone, plus those
//! the parameter index names for its lookup keys. Parameter queries are never run against the
//! source database.

use walsync_rules::{RequestContext, SyncRules};
use walsync_storage::{Result, StoreRead};
use walsync_types::{LookupKey, bucket_id_of_text};

/// The request's buckets at checkpoint `at` (sorted, without repeats), and the lookup keys they
/// were found under (a change to one of those can change the bucket set).
pub fn request_buckets<S: StoreRead + ?Sized>(
    store: &S,
    rules: &SyncRules,
    request: &RequestContext,
    at: u64,
) -> Result<(Vec<String>, Vec<LookupKey>)> {
    let (mut buckets, lookups) = rules.resolve_request(request);
    for key in &lookups {
        for params in store.lookup_texts(key, at)? {
            buckets.push(bucket_id_of_text(&key.definition, &params));
        }
    }
    buckets.sort();
    buckets.dedup();
    Ok((buckets, lookups))
}
