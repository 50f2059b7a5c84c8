//! Value types checked at construction: once one exists, it is valid.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Largest amount a single movement may carry, in minor units (10^15, i.e. ten trillion
/// units of a two-decimal currency). Keeps every sum of a few amounts far from `i64` overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// Largest balance an account may hold, in minor units.
pub const MAX_BALANCE: i64 = 100 * MAX_AMOUNT;

/// Longest owner name accepted, in characters.
pub const MAX_OWNER_CHARS: usize = 200;

/// Longest transfer reference accepted, in characters.
pub const MAX_REFERENCE_CHARS: usize = 140;

/// Active ISO 4217 codes this ledger accepts.
const SUPPORTED_CURRENCIES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
    "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
    "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
    "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
    "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VES",
    "VND", "VUV", "WST", "XAF", "XCD", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// Why a raw value was refused. Each variant is a distinct problem type at the HTTP edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("amount must be between 1 and {max} minor units, got {got}", max = MAX_AMOUNT)]
    AmountOutOfRange { got: i64 },
    #[error("overdraft limit must be between 0 and {max} minor units, got {got}", max = MAX_AMOUNT)]
    OverdraftOutOfRange { got: i64 },
    #[error("currency {0:?} is not a supported ISO 4217 code")]
    UnsupportedCurrency(String),
    #[error("owner must be 1 to {max} characters, not blank", max = MAX_OWNER_CHARS)]
    InvalidOwner,
    #[error("reference must be at most {max} characters, without control characters", max = MAX_REFERENCE_CHARS)]
    InvalidReference,
}

/// An ISO 4217 currency code from the supported list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(code: &str) -> Result<Self, ValueError> {
        match SUPPORTED_CURRENCIES.binary_search(&code) {
            Ok(_) => {
                let bytes = code.as_bytes();
                Ok(Self([bytes[0], bytes[1], bytes[2]]))
            }
            Err(_) => Err(ValueError::UnsupportedCurrency(code.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII codes from SUPPORTED_CURRENCIES are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for Currency {
    type Error = ValueError;
    fn try_from(code: String) -> Result<Self, Self::Error> {
        Self::parse(&code)
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> Self {
        currency.as_str().to_owned()
    }
}

/// A strictly positive amount of minor units, at most [`MAX_AMOUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

impl Amount {
    pub fn parse(minor_units: i64) -> Result<Self, ValueError> {
        if (1..=MAX_AMOUNT).contains(&minor_units) {
            Ok(Self(minor_units))
        } else {
            Err(ValueError::AmountOutOfRange { got: minor_units })
        }
    }

    pub fn minor_units(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Amount {
    type Error = ValueError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<Amount> for i64 {
    fn from(amount: Amount) -> Self {
        amount.0
    }
}

/// How far below zero an account may go, in minor units: 0 to [`MAX_AMOUNT`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct OverdraftLimit(i64);

impl OverdraftLimit {
    pub fn parse(minor_units: i64) -> Result<Self, ValueError> {
        if (0..=MAX_AMOUNT).contains(&minor_units) {
            Ok(Self(minor_units))
        } else {
            Err(ValueError::OverdraftOutOfRange { got: minor_units })
        }
    }

    pub fn minor_units(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for OverdraftLimit {
    type Error = ValueError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<OverdraftLimit> for i64 {
    fn from(limit: OverdraftLimit) -> Self {
        limit.0
    }
}

/// The account holder's name as given, trimmed: 1 to [`MAX_OWNER_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Owner(String);

impl Owner {
    pub fn parse(name: &str) -> Result<Self, ValueError> {
        let name = name.trim();
        let chars = name.chars().count();
        if chars == 0 || chars > MAX_OWNER_CHARS || name.chars().any(char::is_control) {
            return Err(ValueError::InvalidOwner);
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Owner {
    type Error = ValueError;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::parse(&name)
    }
}

impl From<Owner> for String {
    fn from(owner: Owner) -> Self {
        owner.0
    }
}

/// A transfer's free-text reference, trimmed: up to [`MAX_REFERENCE_CHARS`] characters, possibly
/// empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reference(String);

impl Reference {
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        let text = text.trim();
        if text.chars().count() > MAX_REFERENCE_CHARS || text.chars().any(char::is_control) {
            return Err(ValueError::InvalidReference);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Reference {
    type Error = ValueError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl From<Reference> for String {
    fn from(reference: Reference) -> Self {
        reference.0
    }
}

/// The JSON Schema of a value type, for the event contracts: what its checks accept.
macro_rules! value_schema {
    ($type:ty, $schema:tt) => {
        impl JsonSchema for $type {
            fn schema_name() -> Cow<'static, str> {
                stringify!($type).into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

value_schema!(Currency, {
    "type": "string",
    "pattern": "^[A-Z]{3}$",
    "description": "ISO 4217 currency code",
});
value_schema!(Amount, {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_AMOUNT,
    "description": "minor units (cents for EUR), strictly positive",
});
value_schema!(OverdraftLimit, {
    "type": "integer",
    "minimum": 0,
    "maximum": MAX_AMOUNT,
    "description": "how far below zero the balance may go, in minor units",
});
value_schema!(Owner, {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_OWNER_CHARS,
    "description": "the account holder's name",
});
value_schema!(Reference, {
    "type": "string",
    "maxLength": MAX_REFERENCE_CHARS,
    "description": "free text for both account holders",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_currencies_are_sorted_for_binary_search() {
        assert!(SUPPORTED_CURRENCIES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn currency_accepts_iso_codes_only() {
        assert_eq!(Currency::parse("EUR").unwrap().as_str(), "EUR");
        for bad in ["eur", "EU", "EURO", "XXX", "", "€"] {
            assert_eq!(
                Currency::parse(bad),
                Err(ValueError::UnsupportedCurrency(bad.to_owned()))
            );
        }
    }

    #[test]
    fn amount_bounds() {
        assert!(Amount::parse(1).is_ok());
        assert!(Amount::parse(MAX_AMOUNT).is_ok());
        for bad in [0, -1, MAX_AMOUNT + 1, i64::MIN, i64::MAX] {
            assert_eq!(
                Amount::parse(bad),
                Err(ValueError::AmountOutOfRange { got: bad })
            );
        }
    }

    #[test]
    fn overdraft_bounds() {
        assert!(OverdraftLimit::parse(0).is_ok());
        assert!(OverdraftLimit::parse(MAX_AMOUNT).is_ok());
        assert!(OverdraftLimit::parse(-1).is_err());
        assert!(OverdraftLimit::parse(MAX_AMOUNT + 1).is_err());
    }

    #[test]
    fn owner_is_trimmed_and_bounded() {
        assert_eq!(Owner::parse("  Ada ").unwrap().as_str(), "Ada");
        assert!(Owner::parse("   ").is_err());
        assert!(Owner::parse("a\u{0}b").is_err());
        assert!(Owner::parse(&"x".repeat(MAX_OWNER_CHARS)).is_ok());
        assert!(Owner::parse(&"x".repeat(MAX_OWNER_CHARS + 1)).is_err());
    }

    #[test]
    fn serde_refuses_invalid_values() {
        assert!(serde_json::from_str::<Amount>("0").is_err());
        assert!(serde_json::from_str::<Currency>("\"ABC\"").is_err());
        assert_eq!(
            serde_json::to_string(&Currency::parse("JPY").unwrap()).unwrap(),
            "\"JPY\""
        );
    }
}
