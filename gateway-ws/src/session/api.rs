//! The session of a server-side caller of the public API: it proves an
//! app's API key instead of a user's token, then acts for a user of that
//! app (the sender of a message, the user whose inbox is read). Everything
//! it does after that is the same session code a WebSocket client runs.

use switchboard_config::ApiScope;
use switchboard_mesh::{ErrorCode, ServiceError, pb};

use super::{Identity, Session, call, check_recipient};

/// What an API key was checked for.
#[derive(Debug)]
pub struct KeyCheck<'a> {
    pub app_id: &'a str,
    /// The key as presented (`Authorization: Bearer <key>`); `None` when
    /// the request carried none.
    pub key: Option<&'a str>,
    /// The scope the operation needs.
    pub scope: ApiScope,
}

/// An API key that passed [`Session::check_key`]: the session may act for
/// a user of its app ([`Session::act_for`]).
#[derive(Debug)]
pub struct ApiGrant {
    app_id: String,
    app_name: String,
    master_user_id: String,
}

impl Session {
    /// Checks an API key and its scope (the `admin` scope grants every
    /// one). A missing or wrong key is `NOT_AUTHENTICATED`, a missing
    /// scope `FORBIDDEN`.
    pub async fn check_key(&self, check: KeyCheck<'_>) -> Result<ApiGrant, ServiceError> {
        let Some(key) = check.key.filter(|k| !k.is_empty()) else {
            return Err(ServiceError::new(
                ErrorCode::NotAuthenticated,
                "missing API key: send Authorization: Bearer <key>",
            ));
        };
        let reply = call(self.gw.deps.auth.verify_api_key(pb::VerifyApiKeyRequest {
            app_id: check.app_id.to_owned(),
            key: key.to_owned(),
        }))
        .await?;
        if !reply.valid {
            return Err(ServiceError::new(
                ErrorCode::NotAuthenticated,
                format!("invalid API key for app {:?}", check.app_id),
            ));
        }
        let granted = reply
            .scopes
            .iter()
            .any(|s| s == check.scope.as_str() || s == ApiScope::Admin.as_str());
        if !granted {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                format!(
                    "API key {:?} lacks the scope {:?}",
                    reply.key_name,
                    check.scope.as_str()
                ),
            ));
        }
        tracing::debug!(app = %check.app_id, key = %reply.key_name, "api key accepted");
        Ok(ApiGrant {
            app_id: check.app_id.to_owned(),
            app_name: reply.app_name,
            master_user_id: reply.master_user_id,
        })
    }

    /// From now on the session acts as `user` of the grant's app (`None`:
    /// the app's master user), without acknowledged mode.
    pub fn act_for(&mut self, grant: ApiGrant, user: Option<String>) -> Result<(), ServiceError> {
        if self.is_authenticated() {
            return Err(ServiceError::invalid("already authenticated"));
        }
        let user_id = match user {
            Some(user) => user,
            None if !grant.master_user_id.is_empty() => grant.master_user_id,
            None => {
                return Err(ServiceError::invalid(
                    "from is required: the app has no master user",
                ));
            }
        };
        let identity = Identity {
            app_id: grant.app_id,
            app_name: grant.app_name,
            user_id,
            acks: false,
        };
        let max = self.gw.limits.max_user_id_chars;
        crate::commands::check_user_id("from", &identity.user_id, max)?;
        check_recipient(&identity, &identity.user_id, max).map_err(|_| {
            ServiceError::invalid(format!(
                "{:?} is not a user of app {}",
                identity.user_id, identity.app_name
            ))
        })?;
        // Set once: checked above, and only the authenticate methods set it.
        let _ = self.identity.set(identity);
        self.api_caller = true;
        Ok(())
    }

    /// Whether `user` of the session's app has an open connection on any
    /// gateway.
    pub async fn is_online(&self, user: &str) -> Result<bool, ServiceError> {
        let id = self.user()?;
        check_recipient(id, user, self.gw.limits.max_user_id_chars)?;
        let gateways = self
            .gw
            .deps
            .presence
            .gateways(&id.app_id, user)
            .await
            .map_err(|e| ServiceError::unavailable(format!("presence: {e}")))?;
        Ok(gateways.iter().any(|(_, n)| *n > 0))
    }

    /// The online users of the grant's app, sorted, at most
    /// `limits.max_user_list` (`true`: there are more), as
    /// `USER_LIST_REQUEST` answers them.
    pub async fn online_users(
        &self,
        grant: &ApiGrant,
    ) -> Result<(Vec<String>, bool), ServiceError> {
        self.gw
            .deps
            .presence
            .online_users(&grant.app_id, self.gw.limits.max_user_list)
            .await
            .map_err(|e| ServiceError::unavailable(format!("presence: {e}")))
    }

    /// The webhook dead letters of the grant's app, at most one page
    /// (`replay`: moved back to its outbox, to be sent again).
    pub async fn webhook_dead_letters(
        &self,
        grant: &ApiGrant,
        replay: bool,
    ) -> Result<pb::DeadLettersReply, ServiceError> {
        call(
            self.gw
                .deps
                .webhook_admin
                .dead_letters(pb::DeadLettersRequest {
                    app_id: grant.app_id.clone(),
                    replay,
                    max: 0,
                }),
        )
        .await
    }

    /// The number of stored messages waiting in the session user's inbox
    /// (RELIABLE messages and confirmations not delivered yet).
    pub async fn inbox_depth(&self) -> Result<u64, ServiceError> {
        let id = self.user()?;
        let page = call(self.gw.deps.delivery.fetch(pb::FetchRequest {
            app_id: id.app_id.clone(),
            user_id: id.user_id.clone(),
            count: 0,
            after_seq: 0,
        }))
        .await?;
        Ok(page.left)
    }
}

#[cfg(test)]
mod tests {
    use switchboard_config::{ApiScope, Limits};
    use switchboard_mesh::{ErrorCode, pb};

    use super::KeyCheck;
    use crate::commands::{Message, RequestMeta};
    use crate::test_doubles::gateway;

    fn check(key: Option<&str>, scope: ApiScope) -> KeyCheck<'_> {
        KeyCheck {
            app_id: "demo",
            key,
            scope,
        }
    }

    #[tokio::test]
    async fn a_key_with_its_scope_lets_a_session_act_for_a_user_of_its_app() {
        let (gateway, inboxes) = gateway(Limits::default());
        let session = gateway.session();
        for (key, scope, code) in [
            (None, ApiScope::Send, ErrorCode::NotAuthenticated),
            (Some(""), ApiScope::Send, ErrorCode::NotAuthenticated),
            (Some("k-wrong"), ApiScope::Send, ErrorCode::NotAuthenticated),
            (Some("k-send"), ApiScope::Presence, ErrorCode::Forbidden),
        ] {
            let err = session
                .check_key(check(key, scope))
                .await
                .expect_err("refused");
            assert_eq!(err.code, code, "{key:?} {scope:?}: {err}");
        }
        // admin grants every scope
        session
            .check_key(check(Some("k-admin"), ApiScope::Presence))
            .await
            .expect("admin");

        // Not a user of the app: refused, the session stays anonymous.
        let grant = session
            .check_key(check(Some("k-send"), ApiScope::Send))
            .await
            .expect("granted");
        let mut stranger = gateway.session();
        let err = stranger
            .act_for(grant, Some("other-1".into()))
            .expect_err("not of the app");
        assert_eq!(err.code, ErrorCode::InvalidFrame);
        assert!(!stranger.is_authenticated());

        // Without a user: the app's master user sends, as over WebSocket.
        let mut master = gateway.session();
        let grant = master
            .check_key(check(Some("k-send"), ApiScope::Send))
            .await
            .expect("granted");
        master.act_for(grant, None).expect("master user");
        let identity = master.identity().expect("identity");
        assert_eq!(
            (identity.user_id.as_str(), identity.acks),
            ("demo-0", false)
        );
        let msg = Message {
            to: "demo-bob".into(),
            content: "from the backend".into(),
            id: Some("b-1".into()),
            feature: pb::Feature::Reliable,
        };
        let accepted = master
            .send_direct(msg, &RequestMeta::default())
            .await
            .expect("sent");
        assert_eq!(accepted.id, "b-1");
        assert_eq!(inboxes.inbox_len("demo-bob"), 1);

        // Bob's inbox depth, read by a session acting for him.
        let mut reader = gateway.session();
        let grant = reader
            .check_key(check(Some("k-admin"), ApiScope::Admin))
            .await
            .expect("granted");
        reader.act_for(grant, Some("demo-bob".into())).expect("bob");
        assert_eq!(reader.inbox_depth().await.expect("depth"), 1);
        assert!(!reader.is_online("demo-bob").await.expect("presence"));
    }
}
