//! A request's buckets at a checkpoint: those that follow from the request alone, plus those
//! the parameter index names for its lookup keys, each with its priority and the reasons
//! (default streams, subscriptions) the request holds it for. Parameter queries are never run
//! against the source database.

use std::collections::BTreeMap;

use walsync_rules::{RequestContext, StreamRequest, SyncRules};
use walsync_storage::{Result, StoreRead};
use walsync_types::{BucketReason, LookupKey, StreamDescription, bucket_id_of_text};

/// One bucket of a request: the priority it is sent at (the highest, i.e. lowest number, of
/// its reasons) and why the request holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub priority: u32,
    pub reasons: Vec<BucketReason>,
}

/// A request's buckets at a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// By bucket id.
    pub buckets: BTreeMap<String, Placement>,
    /// The lookup keys the buckets were found under (a change to one of those can change the
    /// bucket set).
    pub lookups: Vec<LookupKey>,
    /// The streams the request involves, with the subscriptions that could not be resolved.
    pub streams: Vec<StreamDescription>,
}

/// The buckets `request` (with its stream subscriptions `wanted`) holds at checkpoint `at`.
pub fn request_buckets<S: StoreRead + ?Sized>(
    store: &S,
    rules: &SyncRules,
    request: &RequestContext,
    wanted: &StreamRequest,
    at: u64,
) -> Result<Resolved> {
    let selection = rules.select(request, wanted);
    let mut resolved = Resolved {
        streams: selection.streams,
        ..Resolved::default()
    };
    let mut place = |bucket: String, priority: Option<u8>, reason: Option<BucketReason>| {
        let priority = u32::from(priority.unwrap_or_else(|| {
            rules
                .definition_of(&bucket)
                .map_or(walsync_protocol::DEFAULT_PRIORITY as u8, |d| d.priority)
        }));
        let p = resolved.buckets.entry(bucket).or_insert(Placement {
            priority,
            reasons: Vec::new(),
        });
        p.priority = p.priority.min(priority);
        if let Some(r) = reason
            && !p.reasons.contains(&r)
        {
            p.reasons.push(r);
        }
    };
    for part in selection.parts {
        for bucket in part.buckets {
            place(bucket, part.priority, part.reason);
        }
        for key in &part.lookups {
            for params in store.lookup_texts(key, at)? {
                place(
                    bucket_id_of_text(&key.definition, &params),
                    part.priority,
                    part.reason,
                );
            }
        }
        resolved.lookups.extend(part.lookups);
    }
    resolved.lookups.sort();
    resolved.lookups.dedup();
    Ok(resolved)
}
