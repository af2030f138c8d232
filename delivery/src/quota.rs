//! Inbox quotas: an in-memory count of the messages and bytes each inbox
//! holds, kept by the delivery process that serves the inbox.
//!
//! A count is read from the store the first time an inbox is touched (one
//! page: exact up to [`LOAD_PAGE`] messages, the bytes of longer inboxes
//! estimated from it), then moved by this process's appends and removals,
//! so a send costs no store read. With sharded delivery an inbox is served
//! by one process at a time; the counts are forgotten whenever the member
//! list settles ([`InboxCounters::forget`]), so an inbox gained is read
//! again from the store.

use std::sync::Mutex;

use foldhash::{HashMap, HashMapExt};
use switchboard_mesh::pb;
use switchboard_store::{InboxKey, Store, StoreError};

/// Messages read to initialise an inbox's count.
const LOAD_PAGE: usize = 256;

/// Counts kept before those of empty inboxes are dropped (they are read
/// again from the store when next touched).
const MAX_COUNTED: usize = 1_000_000;

/// The limits (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct InboxQuota {
    pub max_messages: u64,
    pub max_bytes: u64,
    /// Inboxes of one app holding stored messages, as counted here.
    pub app_max_inboxes: u64,
}

impl InboxQuota {
    fn is_off(&self) -> bool {
        self.max_messages == 0 && self.max_bytes == 0 && self.app_max_inboxes == 0
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    messages: u64,
    bytes: u64,
}

#[derive(Default)]
struct State {
    usage: HashMap<InboxKey, Usage>,
    /// Inboxes with stored messages, per app (of those counted).
    nonempty: HashMap<String, u64>,
}

/// What one message of an append was charged; see [`InboxCounters::admit`].
pub(crate) struct Charges {
    /// Per message: refused (the inbox or the app is full). Empty when none is.
    pub refused: Vec<bool>,
}

pub(crate) struct InboxCounters {
    quota: InboxQuota,
    /// Apps with their own quotas (`[[apps]]` `quotas`), by app id.
    per_app: std::collections::HashMap<String, InboxQuota>,
    state: Mutex<State>,
}

/// Stored size of a message, as counted: its strings plus a fixed overhead
/// for the other fields.
pub(crate) fn stored_size(m: &pb::InboxMessage) -> u64 {
    (m.id.len() + m.from.len() + m.to.len() + m.group.len() + m.content.len() + m.reference.len())
        as u64
        + 24
}

impl InboxCounters {
    pub(crate) fn new(quota: InboxQuota) -> Self {
        Self::with_apps(quota, std::collections::HashMap::new())
    }

    /// `quota` for every app but those in `per_app`, which have their own.
    pub(crate) fn with_apps(
        quota: InboxQuota,
        per_app: std::collections::HashMap<String, InboxQuota>,
    ) -> Self {
        InboxCounters {
            quota,
            per_app,
            state: Mutex::new(State {
                usage: HashMap::new(),
                nonempty: HashMap::new(),
            }),
        }
    }

    /// The quota of `app`.
    fn quota(&self, app: &str) -> &InboxQuota {
        self.per_app.get(app).unwrap_or(&self.quota)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves room for `messages` (RELIABLE, of `app`, in order) in their
    /// inboxes: the refused ones take none. What is reserved and then not
    /// stored is given back with [`InboxCounters::release`].
    pub(crate) async fn admit(
        &self,
        store: &dyn Store,
        app: &str,
        messages: &[pb::InboxMessage],
    ) -> Result<Charges, StoreError> {
        let quota = *self.quota(app);
        if quota.is_off() {
            return Ok(Charges {
                refused: Vec::new(),
            });
        }
        let missing: Vec<InboxKey> = {
            let state = self.state();
            let mut missing: Vec<InboxKey> = Vec::new();
            for m in messages {
                let key = InboxKey::new(app, m.to.as_str());
                if !state.usage.contains_key(&key) && !missing.contains(&key) {
                    missing.push(key);
                }
            }
            missing
        };
        for key in missing {
            let usage = load(store, &key).await?;
            let mut state = self.state();
            if state.usage.len() >= MAX_COUNTED {
                state.usage.retain(|_, u| u.messages > 0);
            }
            if !state.usage.contains_key(&key) {
                if usage.messages > 0 {
                    *state.nonempty.entry(key.app_id.clone()).or_default() += 1;
                }
                state.usage.insert(key, usage);
            }
        }
        let mut refused = Vec::new();
        let mut state = self.state();
        let State { usage, nonempty } = &mut *state;
        for (i, m) in messages.iter().enumerate() {
            let key = InboxKey::new(app, m.to.as_str());
            let size = stored_size(m);
            let u = usage.entry(key).or_default();
            let app_count = nonempty.get(app).copied().unwrap_or(0);
            let full = (quota.max_messages > 0 && u.messages >= quota.max_messages)
                || (quota.max_bytes > 0 && u.bytes + size > quota.max_bytes)
                || (quota.app_max_inboxes > 0
                    && u.messages == 0
                    && app_count >= quota.app_max_inboxes);
            if full {
                if refused.is_empty() {
                    refused = vec![false; messages.len()];
                }
                refused[i] = true;
                continue;
            }
            if u.messages == 0 {
                *nonempty.entry(app.to_owned()).or_default() += 1;
            }
            u.messages += 1;
            u.bytes += size;
        }
        Ok(Charges { refused })
    }

    /// Gives back the room reserved for messages that were not stored
    /// (refused by the store, or repeats of an accepted client id).
    pub(crate) fn release<'a>(
        &self,
        app: &str,
        messages: impl Iterator<Item = &'a pb::InboxMessage>,
    ) {
        if self.quota(app).is_off() {
            return;
        }
        let mut state = self.state();
        for m in messages {
            let key = InboxKey::new(app, m.to.as_str());
            remove_from(&mut state, &key, 1, Some(stored_size(m)));
        }
    }

    /// Counts messages stored without a quota check (sender confirmations,
    /// written with the removals): only in inboxes already counted.
    pub(crate) fn appended(&self, app: &str, messages: &[pb::InboxMessage]) {
        if self.quota(app).is_off() {
            return;
        }
        let mut state = self.state();
        let State { usage, nonempty } = &mut *state;
        for m in messages {
            if let Some(u) = usage.get_mut(&InboxKey::new(app, m.to.as_str())) {
                if u.messages == 0 {
                    *nonempty.entry(app.to_owned()).or_default() += 1;
                }
                u.messages += 1;
                u.bytes += stored_size(m);
            }
        }
    }

    /// `count` messages left `inbox` (delivered); their bytes are taken as
    /// the inbox's average, and an emptied inbox counts zero bytes.
    pub(crate) fn removed(&self, inbox: &InboxKey, count: u64) {
        if self.quota(&inbox.app_id).is_off() || count == 0 {
            return;
        }
        remove_from(&mut self.state(), inbox, count, None);
    }

    /// Forgets every count: each inbox is read from the store again when
    /// next touched (after an ownership change).
    pub fn forget(&self) {
        let mut state = self.state();
        state.usage.clear();
        state.nonempty.clear();
    }

    /// Messages and bytes counted for `inbox` (tests, metrics).
    #[cfg(test)]
    fn usage(&self, inbox: &InboxKey) -> Option<(u64, u64)> {
        self.state().usage.get(inbox).map(|u| (u.messages, u.bytes))
    }
}

fn remove_from(state: &mut State, key: &InboxKey, count: u64, bytes: Option<u64>) {
    let Some(u) = state.usage.get_mut(key) else {
        return;
    };
    if u.messages == 0 {
        return;
    }
    let count = count.min(u.messages);
    let bytes = bytes.unwrap_or(u.bytes / u.messages * count);
    u.messages -= count;
    u.bytes = if u.messages == 0 {
        0
    } else {
        u.bytes.saturating_sub(bytes)
    };
    if u.messages == 0
        && let Some(n) = state.nonempty.get_mut(&key.app_id)
    {
        *n = n.saturating_sub(1);
    }
}

/// An inbox's count as the store has it.
async fn load(store: &dyn Store, key: &InboxKey) -> Result<Usage, StoreError> {
    let page = store.fetch(key, 0, LOAD_PAGE).await?;
    let read = page.messages.len() as u64;
    let bytes: u64 = page.messages.iter().map(stored_size).sum();
    let messages = read + page.left;
    let bytes = match read {
        0 => 0,
        _ => bytes / read * messages,
    };
    Ok(Usage { messages, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(to: &str, content: &str) -> pb::InboxMessage {
        pb::InboxMessage {
            id: "id".into(),
            from: "app-ann".into(),
            to: to.into(),
            content: content.into(),
            feature: pb::Feature::Reliable.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_inbox_fills_to_its_quota_and_empties_with_removals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            switchboard_store::FjallStore::open(dir.path(), Default::default()).expect("store");
        // Two messages already stored before the count is first read.
        let stored = [msg("app-bob", "x"), msg("app-bob", "y")];
        store.append("app", &stored, &[]).await.expect("append");
        let counters = InboxCounters::new(InboxQuota {
            max_messages: 3,
            max_bytes: 0,
            app_max_inboxes: 0,
        });
        let bob = InboxKey::new("app", "app-bob");
        let batch = [msg("app-bob", "a"), msg("app-bob", "b"), msg("app-cy", "c")];
        let charges = counters.admit(&store, "app", &batch).await.expect("admit");
        assert_eq!(charges.refused, vec![false, true, false]);
        assert_eq!(counters.usage(&bob).map(|u| u.0), Some(3));
        counters.removed(&bob, 2);
        assert_eq!(counters.usage(&bob).map(|u| u.0), Some(1));
        counters.release("app", [&batch[0]].into_iter());
        assert_eq!(counters.usage(&bob), Some((0, 0)));
        counters.forget();
        assert_eq!(counters.usage(&bob), None);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn bytes_and_new_inboxes_of_an_app_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            switchboard_store::FjallStore::open(dir.path(), Default::default()).expect("store");
        let size = stored_size(&msg("app-a", "0123456789"));
        let counters = InboxCounters::new(InboxQuota {
            max_messages: 0,
            max_bytes: size * 2,
            app_max_inboxes: 2,
        });
        let batch = [
            msg("app-a", "0123456789"),
            msg("app-a", "0123456789"),
            msg("app-a", "0123456789"),
            msg("app-b", "0123456789"),
            msg("app-c", "0123456789"),
        ];
        let charges = counters.admit(&store, "app", &batch).await.expect("admit");
        assert_eq!(charges.refused, vec![false, false, true, false, true]);
        store.close().await.expect("close");
    }
}
