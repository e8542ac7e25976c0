//! How domain values are written to and read from columns, on both
//! backends, as sqlx `Type`/`Encode`/`Decode`, and the rows read with
//! `FromRow`. The formats are fixed by the released migrations:
//!
//! - text values (holder, organization, scopes, state, outcome, sealed
//!   tokens) are TEXT on both;
//! - ids are UUID on PostgreSQL and hyphenated lower-case UUID text on
//!   SQLite;
//! - times are TIMESTAMPTZ on PostgreSQL and [`Timestamp::to_text`] on
//!   SQLite (six fractional digits and `Z`, so text order is time order).
//!
//! A value that does not decode fails the read with sqlx's `ColumnDecode`
//! error, which names the column; `map_sqlx` makes it
//! [`super::StoreError::Corrupt`]. Decode errors never hold the value when
//! it could be secret (a malformed sealed token says only what is wrong).

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueRef, Postgres};
use sqlx::sqlite::{Sqlite, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Database, Decode, Encode, Type};
use uuid::Uuid;

use super::{LeaseRecord, Work};
use crate::crypto::Sealed;
use crate::domain::{
    AuditEvent, AuthorizationId, DomainError, Identity, LeaseId, LeaseState, Organization, Outcome,
    ScopeSet, Timestamp, VersionState,
};

/// Implements `Type`, `Encode` and `Decode` for a value kept as TEXT on
/// every backend, through its text form.
macro_rules! text_column {
    ($ty:ty, |$v:ident| $to_text:expr, |$s:ident| $from_text:expr) => {
        impl<DB: Database> Type<DB> for $ty
        where
            String: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <String as Type<DB>>::type_info()
            }
            fn compatible(ty: &DB::TypeInfo) -> bool {
                <String as Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: Database> Encode<'q, DB> for $ty
        where
            String: Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as Database>::ArgumentBuffer<'q>,
            ) -> Result<IsNull, BoxDynError> {
                let $v = self;
                let text: String = $to_text;
                <String as Encode<'q, DB>>::encode(text, buf)
            }
        }

        impl<'r, DB: Database> Decode<'r, DB> for $ty
        where
            &'r str: Decode<'r, DB>,
        {
            fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let $s = <&'r str as Decode<'r, DB>>::decode(value)?;
                Ok($from_text?)
            }
        }
    };
}

text_column!(Identity, |v| v.to_string(), |s| s.parse::<Identity>());
text_column!(Organization, |v| v.as_str().to_owned(), |s| {
    Organization::parse(s)
});
text_column!(ScopeSet, |v| v.to_upstream(), |s| ScopeSet::parse_upstream(
    s
));
text_column!(LeaseState, |v| v.as_str().to_owned(), |s| s
    .parse::<LeaseState>());
text_column!(VersionState, |v| v.as_str().to_owned(), |s| s
    .parse::<VersionState>());
text_column!(Outcome, |v| v.as_str().to_owned(), |s| Outcome::parse(s)
    .ok_or_else(|| format!("unknown outcome {s:?}")));
// The error says what is wrong with the text, never the text.
text_column!(Sealed, |v| v.encode(), |s| Sealed::decode(s));

/// A UUID column that is not a domain id (the idempotency key's
/// `request_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UuidColumn(pub(crate) Uuid);

impl From<UuidColumn> for Uuid {
    fn from(c: UuidColumn) -> Uuid {
        c.0
    }
}

/// Implements `Type`, `Encode` and `Decode` for an id kept as UUID on
/// PostgreSQL and as hyphenated lower-case UUID text on SQLite.
macro_rules! uuid_column {
    ($ty:ty, |$v:ident| $to_uuid:expr, |$u:ident| $from_uuid:expr) => {
        impl Type<Postgres> for $ty {
            fn type_info() -> PgTypeInfo {
                <Uuid as Type<Postgres>>::type_info()
            }
        }

        impl Encode<'_, Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut <Postgres as Database>::ArgumentBuffer<'_>,
            ) -> Result<IsNull, BoxDynError> {
                let $v = self;
                <Uuid as Encode<Postgres>>::encode($to_uuid, buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $ty {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let $u = <Uuid as Decode<Postgres>>::decode(value)?;
                Ok($from_uuid)
            }
        }

        impl Type<Sqlite> for $ty {
            fn type_info() -> SqliteTypeInfo {
                <String as Type<Sqlite>>::type_info()
            }
            fn compatible(ty: &SqliteTypeInfo) -> bool {
                <String as Type<Sqlite>>::compatible(ty)
            }
        }

        impl<'q> Encode<'q, Sqlite> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut <Sqlite as Database>::ArgumentBuffer<'q>,
            ) -> Result<IsNull, BoxDynError> {
                let $v = self;
                let text = $to_uuid.hyphenated().to_string();
                <String as Encode<'q, Sqlite>>::encode(text, buf)
            }
        }

        impl<'r> Decode<'r, Sqlite> for $ty {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<Sqlite>>::decode(value)?;
                let $u =
                    Uuid::parse_str(text).map_err(|_| DomainError::InvalidUuid(text.to_owned()))?;
                Ok($from_uuid)
            }
        }
    };
}

uuid_column!(LeaseId, |v| v.as_uuid(), |u| LeaseId::from_uuid(u));
uuid_column!(AuthorizationId, |v| v.as_uuid(), |u| {
    AuthorizationId::from_uuid(u)
});
uuid_column!(UuidColumn, |v| v.0, |u| UuidColumn(u));

impl Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        <chrono::DateTime<chrono::Utc> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Timestamp {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer<'_>,
    ) -> Result<IsNull, BoxDynError> {
        <chrono::DateTime<chrono::Utc> as Encode<Postgres>>::encode(self.as_datetime(), buf)
    }
}

impl<'r> Decode<'r, Postgres> for Timestamp {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(<chrono::DateTime<chrono::Utc> as Decode<Postgres>>::decode(value)?.into())
    }
}

impl Type<Sqlite> for Timestamp {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Timestamp {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer<'q>,
    ) -> Result<IsNull, BoxDynError> {
        <String as Encode<'q, Sqlite>>::encode(self.to_text(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Timestamp {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        Timestamp::parse_text(text).map_err(|e| format!("{text:?}: {e}").into())
    }
}

/// An `audit_events` row's event (its `mac` is read apart).
#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    id: i64,
    time: Timestamp,
    identity: String,
    peer: Option<String>,
    action: String,
    outcome: Outcome,
    reason: Option<String>,
    policy_rule: Option<String>,
    lease_id: Option<LeaseId>,
    organization: Option<String>,
    scopes: Option<String>,
    token_fingerprint: Option<String>,
    caller_detail: Option<String>,
}

impl From<AuditRow> for AuditEvent {
    fn from(r: AuditRow) -> Self {
        AuditEvent {
            id: r.id,
            time: r.time,
            identity: r.identity,
            peer: r.peer,
            action: r.action,
            outcome: r.outcome,
            reason: r.reason,
            policy_rule: r.policy_rule,
            lease_id: r.lease_id,
            organization: r.organization,
            scopes: r.scopes,
            token_fingerprint: r.token_fingerprint,
            caller_detail: r.caller_detail,
        }
    }
}

/// States that count against a holder's quota ([`super::Store::count_live_leases`]).
pub(crate) const LIVE_STATES: [LeaseState; 3] = [
    LeaseState::Active,
    LeaseState::Pending,
    LeaseState::Revoking,
];

/// Orders claimed leases by when they fell due, then id (RETURNING has no order).
pub(crate) fn sort_due(leases: &mut [LeaseRecord], work: Work) {
    match work {
        Work::Expiry => leases.sort_by_key(|l| (l.expire_time, l.id)),
        Work::Revocation => leases.sort_by_key(|l| (l.next_attempt_time, l.id)),
        Work::Reconcile { .. } => leases.sort_by_key(|l| (l.create_time, l.id)),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::store::{map_sqlx, SqliteStore, StoreError};

    /// The text each value is written as on SQLite: the released format.
    #[tokio::test]
    async fn sqlite_columns_keep_their_text_forms() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        let t = chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
            + chrono::Duration::nanoseconds(123_456_789);
        let id = LeaseId::from_uuid(Uuid::from_u128(0xABCD));
        let sealed = sealed();
        let row: (String, String, String, String, String) =
            sqlx::query_as("SELECT $1, $2, $3, $4, $5")
                .bind(Timestamp::from(t))
                .bind(id)
                .bind(LeaseState::RevokeFailed)
                .bind(Outcome::Denied)
                .bind(sealed.clone())
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(row.0, "2026-01-02T03:04:05.123456Z");
        assert_eq!(row.1, "00000000-0000-0000-0000-00000000abcd");
        assert_eq!(row.2, "REVOKE_FAILED");
        assert_eq!(row.3, "denied");
        assert_eq!(row.4, Sealed::encode(&sealed));

        let (back, back_id, back_sealed): (Timestamp, LeaseId, Sealed) =
            sqlx::query_as("SELECT $1, $2, $3")
                .bind(row.0)
                .bind(row.1)
                .bind(row.4)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(back, Timestamp::from(t));
        assert_eq!(back_id, id);
        assert_eq!(back_sealed, sealed);
    }

    /// A value that does not decode is `Corrupt`, names its column and
    /// never holds a sealed value's text.
    #[tokio::test]
    async fn undecodable_values_are_corrupt_and_never_show_a_secret() {
        let err = corrupt(sqlx::query_as(
            "SELECT 1 AS version, 'v1:k1:!!secret!!' AS sealed, \
             '2026-01-02T03:04:05.000000Z' AS update_time",
        ))
        .await;
        let text = err.to_string();
        assert!(text.contains("\"sealed\""), "{text}");
        assert!(!text.contains("secret"), "{text}");

        let err = corrupt(
            sqlx::query_as("SELECT 1 AS version, $1 AS sealed, '2026-01-02 03:04' AS update_time")
                .bind(Sealed::encode(&sealed())),
        )
        .await;
        assert!(err.to_string().contains("\"update_time\""), "{err}");
    }

    fn sealed() -> Sealed {
        Sealed {
            key_id: "k1".into(),
            nonce: [7; 12],
            ciphertext: vec![1; 20],
        }
    }

    /// A row of a version, a sealed value and a time, as the upstream
    /// credential's columns are.
    #[derive(sqlx::FromRow)]
    #[allow(dead_code)]
    struct CredentialRow {
        version: i64,
        sealed: Sealed,
        update_time: Timestamp,
    }

    /// The error reading one credential row with `query`, which must be
    /// `Corrupt`.
    async fn corrupt<'q>(
        query: sqlx::query::QueryAs<
            'q,
            sqlx::Sqlite,
            CredentialRow,
            sqlx::sqlite::SqliteArguments<'q>,
        >,
    ) -> StoreError {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        let err = query
            .fetch_one(store.pool())
            .await
            .map(drop)
            .map_err(map_sqlx)
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        err
    }
}
