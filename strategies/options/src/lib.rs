//! Parses a plugin's RON options string into its options struct.
//!
//! Invariant: an empty string means all defaults; anything else must be a
//! RON struct (optional fields take plain values) whose fields all exist (`deny_unknown_fields` on the target
//! type), so a typo fails with ron's list of the valid field names.

use serde::de::DeserializeOwned;
pub use simfreeze_abi::sdk::PolicyError;

/// Parses `text` (empty: `T::default()`).
pub fn parse<T: DeserializeOwned + Default>(text: &str) -> Result<T, PolicyError> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    // Optional options take plain values: `(max_frozen: 6)`.
    ron::Options::default()
        .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
        .from_str(text)
        .map_err(PolicyError::options)
}

/// Serialises a policy state to bytes.
pub fn save<T: serde::Serialize>(state: &T) -> Result<Vec<u8>, PolicyError> {
    ron::to_string(state)
        .map(String::into_bytes)
        .map_err(PolicyError::state)
}

/// Restores a policy state from [`save`]'s bytes.
pub fn load<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PolicyError> {
    let text = std::str::from_utf8(bytes).map_err(PolicyError::state)?;
    ron::from_str(text).map_err(PolicyError::state)
}

/// The `save_state` / `load_state` pair of a policy whose whole state is
/// one serde field, kept as RON: write `simfreeze_options::serde_state!(s);`
/// inside `impl Policy for ...` instead of the two methods. (The SDK itself
/// stays free of serde, so this lives with the shipped policies' other
/// shared helpers.)
#[macro_export]
macro_rules! serde_state {
    ($field:ident) => {
        fn save_state(&self) -> Result<Vec<u8>, $crate::PolicyError> {
            $crate::save(&self.$field)
        }

        fn load_state(&mut self, state: &[u8]) -> Result<(), $crate::PolicyError> {
            self.$field = $crate::load(state)?;
            Ok(())
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
    #[serde(default, deny_unknown_fields)]
    struct O {
        a: u32,
        b: f64,
    }

    #[test]
    fn empty_is_default_and_unknown_lists_valid() {
        assert_eq!(parse::<O>(" ").unwrap(), O::default());
        assert_eq!(parse::<O>("(a: 3)").unwrap().a, 3);
        let e = parse::<O>("(c: 1)").unwrap_err();
        assert!(
            e.message.contains('a') && e.message.contains('b'),
            "{}",
            e.message
        );
    }

    #[test]
    fn state_round_trips() {
        let o = O { a: 4, b: 0.25 };
        assert_eq!(load::<O>(&save(&o).unwrap()).unwrap(), o);
        assert!(load::<O>(b"\xff").is_err());
    }
}
