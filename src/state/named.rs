//! Typed names in the state file: a record's backend and table family are [`Backend`] and
//! [`Family`], written as the same strings as before (`"nft"`/`"legacy"`, `"ip"`/`"ip6"`), and
//! a name this masqd does not know is kept verbatim so that teardown can name it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::backend::Backend;
use crate::policy::Family;

/// A type with one name per value in the state file.
pub trait Name: Copy + PartialEq + 'static {
    /// Its name.
    fn name(self) -> &'static str;
    /// The value of a name.
    fn of_name(s: &str) -> Option<Self>;
}

impl Name for Backend {
    fn name(self) -> &'static str {
        Backend::name(self)
    }
    fn of_name(s: &str) -> Option<Backend> {
        Backend::from_name(s)
    }
}

impl Name for Family {
    fn name(self) -> &'static str {
        self.nft_keyword()
    }
    fn of_name(s: &str) -> Option<Family> {
        Family::from_nft_keyword(s)
    }
}

/// A known value, or a name from a state file this masqd does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named<T> {
    /// A value this masqd knows.
    Known(T),
    /// Any other name, verbatim.
    Unknown(String),
}

/// A record's backend.
pub type RecordBackend = Named<Backend>;
/// A record's table family (`ip`, `ip6`).
pub type RecordFamily = Named<Family>;

impl<T: Name> Named<T> {
    /// The known value, if it is one.
    pub fn known(&self) -> Option<T> {
        match self {
            Named::Known(t) => Some(*t),
            Named::Unknown(_) => None,
        }
    }

    /// The name as written in the state file.
    pub fn as_str(&self) -> &str {
        match self {
            Named::Known(t) => t.name(),
            Named::Unknown(s) => s,
        }
    }
}

impl<T: Name> From<&str> for Named<T> {
    fn from(s: &str) -> Named<T> {
        T::of_name(s).map_or_else(|| Named::Unknown(s.to_string()), Named::Known)
    }
}

impl<T: Name> From<String> for Named<T> {
    fn from(s: String) -> Named<T> {
        Named::from(s.as_str())
    }
}

impl From<Backend> for RecordBackend {
    fn from(b: Backend) -> RecordBackend {
        Named::Known(b)
    }
}

impl From<Family> for RecordFamily {
    fn from(f: Family) -> RecordFamily {
        Named::Known(f)
    }
}

impl<T: Name> std::fmt::Display for Named<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<T: Name> Serialize for Named<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de, T: Name> Deserialize<'de> for Named<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Named<T>, D::Error> {
        Ok(Named::from(String::deserialize(d)?))
    }
}
