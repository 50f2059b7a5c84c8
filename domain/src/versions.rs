//! Event versions: reading events that older code stored.
//!
//! Stored events are never rewritten (the hash chain covers them), so an event whose data
//! changes gets a new version, and every reader upcasts older versions to the current one
//! with cqrs-es's [`EventUpcaster`]s before deserializing. Readers of the event store and of
//! Kafka go through [`read_stored`] alike.

use std::str::FromStr;
use std::sync::LazyLock;

use cqrs_es::DomainEvent;
use cqrs_es::persist::{
    EventUpcaster, SemanticVersion, SemanticVersionEventUpcaster, SerializedEvent,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::account::AccountEvent;
use crate::money::MAX_BALANCE;
use crate::transfer::TransferEvent;

/// An event type whose older versions can still be read.
pub trait StoredEvent: DomainEvent + DeserializeOwned {
    /// Upcasters from every older version, in the order they apply.
    fn upcasters() -> &'static [Box<dyn EventUpcaster>];
}

static ACCOUNT_UPCASTERS: LazyLock<Vec<Box<dyn EventUpcaster>>> = LazyLock::new(|| {
    vec![Box::new(SemanticVersionEventUpcaster::new(
        "AccountOpened",
        "2",
        Box::new(|payload| with_field(payload, "AccountOpened", "max_balance", MAX_BALANCE)),
    ))]
});

impl StoredEvent for AccountEvent {
    fn upcasters() -> &'static [Box<dyn EventUpcaster>] {
        &ACCOUNT_UPCASTERS
    }
}

impl StoredEvent for TransferEvent {
    fn upcasters() -> &'static [Box<dyn EventUpcaster>] {
        &[]
    }
}

/// Why a stored event cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{event_type} version {event_version} is not a version this code reads")]
    UnsupportedVersion {
        event_type: String,
        event_version: String,
    },
    #[error("{event_type} version {event_version}: {source}")]
    Unreadable {
        event_type: String,
        event_version: String,
        source: serde_json::Error,
    },
}

/// Reads an event as stored: `payload` in cqrs-es's form (`{"<EventType>": data}`, or
/// `"<EventType>"` without data) at `event_version`, upcast to the current version.
pub fn read_stored<E: StoredEvent>(
    event_type: &str,
    event_version: &str,
    payload: Value,
) -> Result<E, ReadError> {
    let mut event = SerializedEvent::new(
        String::new(),
        0,
        String::new(),
        event_type.to_owned(),
        event_version.to_owned(),
        payload,
        Value::Null,
    );
    for upcaster in E::upcasters() {
        if upcaster.can_upcast(&event.event_type, &event.event_version) {
            event = upcaster.upcast(event);
        }
    }
    let unsupported = || ReadError::UnsupportedVersion {
        event_type: event_type.to_owned(),
        event_version: event_version.to_owned(),
    };
    let decoded: E =
        serde_json::from_value(event.payload).map_err(|source| ReadError::Unreadable {
            event_type: event_type.to_owned(),
            event_version: event_version.to_owned(),
            source,
        })?;
    // A version newer than this code, or one no upcaster brought up to date, would otherwise
    // be read as if it were current.
    let current = SemanticVersion::from_str(&decoded.event_version()).map_err(|_| unsupported())?;
    let read_as = SemanticVersion::from_str(&event.event_version).map_err(|_| unsupported())?;
    if decoded.event_type() != event_type || current != read_as {
        return Err(unsupported());
    }
    Ok(decoded)
}

/// `payload` with `field` set to `value` in the data of `event_type`, unless already there.
fn with_field(mut payload: Value, event_type: &str, field: &str, value: i64) -> Value {
    if let Some(Value::Object(data)) = payload.get_mut(event_type) {
        data.entry(field).or_insert(value.into());
    }
    payload
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::money::{Currency, OverdraftLimit, Owner};

    fn opened_v1() -> Value {
        json!({"AccountOpened": {"tenant": "acme", "owner": "Ada", "currency": "EUR",
                                  "overdraft_limit": 0}})
    }

    #[test]
    fn account_opened_v1_reads_with_the_ceiling_it_had() {
        let event: AccountEvent = read_stored("AccountOpened", "1", opened_v1()).unwrap();
        assert_eq!(
            event,
            AccountEvent::AccountOpened {
                tenant: "acme".into(),
                owner: Owner::parse("Ada").unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                overdraft_limit: OverdraftLimit::default(),
                max_balance: MAX_BALANCE,
            }
        );
        assert_eq!(event.event_version(), "2");
    }

    #[test]
    fn current_versions_read_as_written() {
        let mut v2 = opened_v1();
        v2["AccountOpened"]["max_balance"] = json!(500);
        let event: AccountEvent = read_stored("AccountOpened", "2", v2).unwrap();
        assert!(matches!(
            event,
            AccountEvent::AccountOpened {
                max_balance: 500,
                ..
            }
        ));
        let frozen: AccountEvent =
            read_stored("AccountFrozen", "1", json!("AccountFrozen")).unwrap();
        assert_eq!(frozen, AccountEvent::AccountFrozen);
    }

    #[test]
    fn unknown_versions_and_mismatched_types_are_refused() {
        let mut v3 = opened_v1();
        v3["AccountOpened"]["max_balance"] = json!(500);
        for (event_type, event_version, payload) in [
            ("AccountOpened", "3", v3.clone()),
            ("AccountFrozen", "2", json!("AccountFrozen")),
            ("AccountFrozen", "1", json!("AccountUnfrozen")),
            ("AccountOpened", "x", v3),
        ] {
            assert!(
                matches!(
                    read_stored::<AccountEvent>(event_type, event_version, payload),
                    Err(ReadError::UnsupportedVersion { .. })
                ),
                "{event_type} v{event_version}"
            );
        }
        assert!(matches!(
            read_stored::<AccountEvent>("AccountOpened", "2", opened_v1()),
            Err(ReadError::Unreadable { .. })
        ));
    }
}
