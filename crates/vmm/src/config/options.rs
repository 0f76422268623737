//! The one parser for `key=value,...` option strings (`--disk`, `--net`,
//! `--balloon`). Every option type states the keys it knows and converts
//! the values it takes; the parser checks the shape of the string once, so
//! every option reports the same kinds of mistakes the same way: each
//! [`OptionError`] names the option (`disk`, `net`, ...) and the key.
//!
//! Invariants of a parsed [`Options`]: every key is one of the known keys
//! and appears once; empty parts (`a=1,,b=2`, a trailing comma) are skipped.

use std::fmt::Display;
use std::str::FromStr;

/// What is wrong with an option string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A part without `=`.
    #[error("bad {option} option '{part}' in '{text}' (expected key=value)")]
    NotKeyValue {
        option: &'static str,
        part: String,
        text: String,
    },
    /// A key the option does not have.
    #[error("unknown {option} option '{key}' (expected {})", expected.join(", "))]
    UnknownKey {
        option: &'static str,
        key: String,
        expected: &'static [&'static str],
    },
    /// The same key twice: which one should win is a guess.
    #[error("{option} option '{key}' is given twice")]
    Repeated { option: &'static str, key: String },
    /// A value the key does not take.
    #[error("{option} option {key}={value}: {reason}")]
    BadValue {
        option: &'static str,
        key: &'static str,
        value: String,
        reason: String,
    },
    /// A key that must be given is missing.
    #[error("{option} '{text}' has no {key}=... (it is required)")]
    Missing {
        option: &'static str,
        key: &'static str,
        text: String,
    },
}

/// One option string split into its keys and values.
#[derive(Debug)]
pub struct Options<'a> {
    option: &'static str,
    text: &'a str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Options<'a> {
    /// Split `text` (`key=value,...`) for the option named `option`, which
    /// knows the keys in `known`.
    pub fn parse(
        option: &'static str,
        text: &'a str,
        known: &'static [&'static str],
    ) -> Result<Self, OptionError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| OptionError::NotKeyValue {
                    option,
                    part: part.into(),
                    text: text.into(),
                })?;
            if !known.contains(&key) {
                return Err(OptionError::UnknownKey {
                    option,
                    key: key.into(),
                    expected: known,
                });
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(OptionError::Repeated {
                    option,
                    key: key.into(),
                });
            }
            pairs.push((key, value));
        }
        Ok(Options {
            option,
            text,
            pairs,
        })
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The value of `key` converted by its type's `FromStr`, if given.
    pub fn value<T>(&self, key: &'static str) -> Result<Option<T>, OptionError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.get(key)
            .map(|v| v.parse().map_err(|e: T::Err| self.bad(key, v, e)))
            .transpose()
    }

    /// The value of a key that must be given.
    pub fn required<T>(&self, key: &'static str) -> Result<T, OptionError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.value(key)?.ok_or_else(|| OptionError::Missing {
            option: self.option,
            key,
            text: self.text.into(),
        })
    }

    /// An on/off switch (`on`, `true`, `yes` / `off`, `false`, `no`).
    pub fn toggle(&self, key: &'static str) -> Result<Option<bool>, OptionError> {
        self.get(key)
            .map(|v| match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(self.bad(key, v, "expected on or off")),
            })
            .transpose()
    }

    pub fn bad(&self, key: &'static str, value: &str, reason: impl Display) -> OptionError {
        OptionError::BadValue {
            option: self.option,
            key,
            value: value.into(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["path", "size", "ro"];

    #[test]
    fn splits_and_converts() {
        let o = Options::parse("disk", "path=/a,size=3,,ro=on,", KEYS).unwrap();
        assert_eq!(o.get("path"), Some("/a"));
        assert_eq!(o.value::<u32>("size"), Ok(Some(3)));
        assert_eq!(o.toggle("ro"), Ok(Some(true)));
        assert_eq!(Options::parse("disk", "", KEYS).unwrap().get("path"), None);
    }

    #[test]
    fn errors_name_the_option_and_the_key() {
        let e = Options::parse("disk", "path", KEYS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad disk option 'path' in 'path' (expected key=value)"
        );
        let e = Options::parse("disk", "path=/a,cache=none", KEYS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown disk option 'cache' (expected path, size, ro)"
        );
        let e = Options::parse("disk", "ro=on,ro=off", KEYS).unwrap_err();
        assert_eq!(e.to_string(), "disk option 'ro' is given twice");
        let o = Options::parse("disk", "size=x,ro=maybe", KEYS).unwrap();
        let e = o.value::<u32>("size").unwrap_err().to_string();
        assert!(e.starts_with("disk option size=x: "), "{e}");
        assert_eq!(
            o.toggle("ro").unwrap_err().to_string(),
            "disk option ro=maybe: expected on or off"
        );
        let e = o.required::<String>("path").unwrap_err().to_string();
        assert_eq!(e, "disk 'size=x,ro=maybe' has no path=... (it is required)");
    }
}
