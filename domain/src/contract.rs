//! The data of every event type and version, as JSON Schema (draft 2020-12), generated from
//! the event types themselves so that the published contract cannot drift from the code.
//!
//! Each schema describes an event's *data*: the variant's fields without cqrs-es's
//! `{"<EventType>": ...}` wrapper, which is what a Kafka message's value holds (`{}` for events
//! without fields). Schemas are self-contained (no `$ref`), so each stands alone in a file and
//! inside the AsyncAPI document.

use cqrs_es::Aggregate;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::account::{Account, AccountEvent, AccountOpenedV1};
use crate::transfer::{Transfer, TransferEvent};

pub const JSON_SCHEMA_DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// One version of one event type.
#[derive(Debug, Clone, PartialEq)]
pub struct EventContract {
    /// `account` or `transfer`.
    pub aggregate_type: &'static str,
    pub event_type: String,
    pub event_version: &'static str,
    /// True for the version new events are written as; older versions are still in stores,
    /// and still published as stored.
    pub current: bool,
    /// The data's schema, without `$schema`.
    pub schema: Value,
}

/// Every event type and version, account events first, each sorted by type and version.
pub fn event_contracts() -> Vec<EventContract> {
    let mut contracts = variants::<AccountEvent>(Account::TYPE, AccountEvent::current_version);
    contracts.push(EventContract {
        aggregate_type: Account::TYPE,
        event_type: "AccountOpened".into(),
        event_version: "1",
        current: false,
        schema: data_schema(
            schema_for::<AccountOpenedV1>(),
            "An account was opened, with a zero balance (version 1: before accounts recorded \
             their balance ceiling, which was 10^17 minor units for all).",
        ),
    });
    contracts
        .sort_by(|a, b| (&a.event_type, a.event_version).cmp(&(&b.event_type, b.event_version)));
    let mut transfers = variants::<TransferEvent>(Transfer::TYPE, TransferEvent::current_version);
    transfers.sort_by(|a, b| a.event_type.cmp(&b.event_type));
    contracts.extend(transfers);
    contracts
}

fn schema_for<T: JsonSchema>() -> Value {
    let mut schema = SchemaSettings::draft2020_12()
        .with(|settings| settings.inline_subschemas = true)
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value();
    unwrap_descriptions(&mut schema);
    schema
}

/// Joins the lines of descriptions taken from doc comments, which wrap at 100 columns.
fn unwrap_descriptions(schema: &mut Value) {
    match schema {
        Value::Object(fields) => {
            for (name, value) in fields.iter_mut() {
                match value {
                    Value::String(text) if name == "description" => {
                        *text = text.replace('\n', " ");
                    }
                    value => unwrap_descriptions(value),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// The current version of each variant of the externally tagged enum `E`, read off its schema:
/// a `oneOf` of `{"<Variant>": data}` objects and of strings for variants without data.
fn variants<E: JsonSchema>(
    aggregate_type: &'static str,
    current_version: fn(&str) -> &'static str,
) -> Vec<EventContract> {
    let schema = schema_for::<E>();
    let one_of = schema
        .get("oneOf")
        .and_then(Value::as_array)
        .expect("an event enum's schema is a oneOf of its variants");
    let mut contracts = Vec::new();
    let mut push = |event_type: &str, schema: Value| {
        contracts.push(EventContract {
            aggregate_type,
            event_type: event_type.to_owned(),
            event_version: current_version(event_type),
            current: true,
            schema,
        });
    };
    for variant in one_of {
        let description = variant["description"].as_str().unwrap_or_default();
        match (&variant["properties"], &variant["const"], &variant["enum"]) {
            (Value::Object(properties), _, _) => {
                let (event_type, data) = properties
                    .iter()
                    .next()
                    .expect("a variant with data has one property, its name");
                push(event_type, data_schema(data.clone(), description));
            }
            (_, Value::String(event_type), _) => push(event_type, no_data(description)),
            (_, _, Value::Array(names)) => {
                for event_type in names.iter().filter_map(Value::as_str) {
                    push(event_type, no_data(description));
                }
            }
            _ => panic!("unexpected variant schema {variant}"),
        }
    }
    contracts
}

/// `data` as published: closed (the relay sends exactly the stored fields), described, and
/// without the generator's dialect and title.
fn data_schema(mut data: Value, description: &str) -> Value {
    if let Value::Object(fields) = &mut data {
        fields.remove("$schema");
        fields.remove("title");
        if !description.is_empty() {
            fields.insert("description".into(), description.into());
        }
        fields.insert("additionalProperties".into(), false.into());
    }
    data
}

/// The data of an event without fields: an empty object.
fn no_data(description: &str) -> Value {
    let mut schema = Map::new();
    if !description.is_empty() {
        schema.insert("description".into(), description.into());
    }
    schema.insert("type".into(), "object".into());
    schema.insert("additionalProperties".into(), false.into());
    Value::Object(schema)
}

/// A contract's schema as a standalone document: `$schema` and a title added.
pub fn standalone(contract: &EventContract) -> Value {
    let mut document = json!({
        "$schema": JSON_SCHEMA_DIALECT,
        "title": format!(
            "ledger.{}.{}.v{}",
            contract.aggregate_type, contract.event_type, contract.event_version
        ),
    });
    if let (Value::Object(document), Value::Object(schema)) = (&mut document, &contract.schema) {
        document.extend(schema.clone());
    }
    document
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde::de::{Deserialize, Visitor};

    use super::*;
    use crate::versions::StoredEvent;

    /// The variant names `E`'s derived `Deserialize` reads, which are the event types stored:
    /// taken from serde, not from the JSON Schema the contracts are made of.
    fn stored_event_types<E: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        let mut names: &'static [&'static str] = &[];
        let _ = E::deserialize(VariantNames(&mut names));
        assert!(!names.is_empty(), "not an enum");
        names
    }

    /// A deserializer that only notes the variants an enum asks for, then stops.
    struct VariantNames<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Stop;

    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }

    impl std::error::Error for Stop {}

    impl serde::de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop
        }
    }

    impl<'de> serde::Deserializer<'de> for VariantNames<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = variants;
            Err(Stop)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
            ignored_any
        }
    }

    /// What the contracts must be, derived from the event types: each type at the version it
    /// is written as, and each older version at which stores still hold it, which a reader
    /// must upcast (so an upcaster must exist) and analysts must find described.
    fn contracts_of<E: StoredEvent + for<'de> Deserialize<'de>>(
        aggregate_type: &'static str,
        current_version: fn(&str) -> &'static str,
    ) -> BTreeSet<(&'static str, &'static str, String, bool)> {
        let mut expected = BTreeSet::new();
        for &event_type in stored_event_types::<E>() {
            let current: u32 = current_version(event_type).parse().unwrap();
            expected.insert((aggregate_type, event_type, current.to_string(), true));
            for older in (1..current).map(|version| version.to_string()) {
                assert!(
                    E::upcasters()
                        .iter()
                        .any(|upcaster| upcaster.can_upcast(event_type, &older)),
                    "{event_type} version {older} is stored but nothing upcasts it"
                );
                expected.insert((aggregate_type, event_type, older, false));
            }
        }
        expected
    }

    #[test]
    fn every_event_type_and_every_version_still_stored_has_exactly_one_contract() {
        let contracts = event_contracts();
        let mut expected =
            contracts_of::<AccountEvent>(Account::TYPE, AccountEvent::current_version);
        expected.extend(contracts_of::<TransferEvent>(
            Transfer::TYPE,
            TransferEvent::current_version,
        ));
        let actual: Vec<_> = contracts
            .iter()
            .map(|c| {
                (
                    c.aggregate_type,
                    c.event_type.as_str(),
                    c.event_version.to_owned(),
                    c.current,
                )
            })
            .collect();
        let distinct: BTreeSet<_> = actual.iter().cloned().collect();
        assert_eq!(distinct.len(), actual.len(), "a contract listed twice");
        assert_eq!(distinct, expected);
        // The one older version today, as a reminder of what the rule above derives.
        assert!(distinct.contains(&(Account::TYPE, "AccountOpened", "1".to_owned(), false)));
    }

    #[test]
    fn schemas_describe_the_data_without_the_wrapper() {
        let contracts = event_contracts();
        let find = |event_type: &str, version: &str| {
            contracts
                .iter()
                .find(|c| c.event_type == event_type && c.event_version == version)
                .map(|c| &c.schema)
                .unwrap()
        };
        let deposited = find("MoneyDeposited", "1");
        assert_eq!(deposited["type"], "object");
        assert_eq!(deposited["properties"]["amount"]["minimum"], 1);
        assert_eq!(deposited["properties"]["currency"]["pattern"], "^[A-Z]{3}$");
        assert_eq!(deposited["additionalProperties"], false);
        let required = find("AccountOpened", "2")["required"].as_array().unwrap();
        assert!(required.contains(&json!("max_balance")));
        let required = find("AccountOpened", "1")["required"].as_array().unwrap();
        assert!(!required.contains(&json!("max_balance")));
        assert_eq!(find("AccountFrozen", "1")["type"], "object");
        assert_eq!(
            find("TransferRequested", "1")["properties"]["from"]["format"],
            "uuid"
        );
        assert!(
            !serde_json::to_string(&contracts.iter().map(|c| &c.schema).collect::<Vec<_>>())
                .unwrap()
                .contains("$ref")
        );
    }
}
