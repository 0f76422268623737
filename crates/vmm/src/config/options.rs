//! The one parser for `key=value,...` option strings (`--disk`, `--net`,
//! `--balloon`). Every option type states the keys it knows and converts
//! the values it takes; the parser checks the shape of the string once, so
//! every option reports the same kinds of mistakes the same way: each
//! [`OptionError`] names the option (`disk`, `net`, ...) and the key.
//!
//! Invariants of a parsed [`Options`]: every key is one of the known keys
//! and appears once, except the keys an option declares repeatable
//! (`--net user,hostfwd=...,hostfwd=...`); a bare word without `=` is
//! taken only first and only from the option's list of kinds (`user`);
//! empty parts (`a=1,,b=2`, a trailing comma) are skipped.

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
    /// A first word that is not one of the option's kinds.
    #[error("unknown {option} kind '{word}' (expected {})", expected.join(", "))]
    UnknownKind {
        option: &'static str,
        word: String,
        expected: &'static [&'static str],
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
    /// The bare first word (one of the option's kinds), if given.
    kind: Option<&'a str>,
    pairs: Vec<(&'a str, &'a str)>,
}

/// The shape of an option beyond its keys: [`Options::parse_spec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Spec {
    pub known: &'static [&'static str],
    /// Bare words the option may start with (`user` in `--net user,...`).
    pub kinds: &'static [&'static str],
    /// Keys that may be given more than once, in order.
    pub repeatable: &'static [&'static str],
}

impl<'a> Options<'a> {
    /// Split `text` (`key=value,...`) for the option named `option`, which
    /// knows the keys in `known`.
    pub fn parse(
        option: &'static str,
        text: &'a str,
        known: &'static [&'static str],
    ) -> Result<Self, OptionError> {
        Self::parse_spec(
            option,
            text,
            Spec {
                known,
                ..Spec::default()
            },
        )
    }

    /// Split `text` for an option that may start with a kind and may
    /// repeat some keys.
    pub fn parse_spec(
        option: &'static str,
        text: &'a str,
        spec: Spec,
    ) -> Result<Self, OptionError> {
        let known = spec.known;
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let mut kind = None;
        for (i, part) in text.split(',').filter(|p| !p.is_empty()).enumerate() {
            if i == 0 && !spec.kinds.is_empty() && !part.contains('=') {
                if !spec.kinds.contains(&part) {
                    return Err(OptionError::UnknownKind {
                        option,
                        word: part.into(),
                        expected: spec.kinds,
                    });
                }
                kind = Some(part);
                continue;
            }
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
            if !spec.repeatable.contains(&key) && pairs.iter().any(|(k, _)| *k == key) {
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
            kind,
            pairs,
        })
    }

    /// The bare first word, if the option was given one.
    pub fn kind(&self) -> Option<&'a str> {
        self.kind
    }

    /// Every value of a repeatable key, converted, in the order given.
    pub fn all<T>(&self, key: &'static str) -> Result<Vec<T>, OptionError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.pairs
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.parse().map_err(|e: T::Err| self.bad(key, v, e)))
            .collect()
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

    #[test]
    fn kinds_and_repeatable_keys() {
        let spec = Spec {
            known: &["hostfwd", "mac"],
            kinds: &["user", "tap"],
            repeatable: &["hostfwd"],
        };
        let o = Options::parse_spec("net", "user,hostfwd=a,mac=m,hostfwd=b", spec).unwrap();
        assert_eq!(o.kind(), Some("user"));
        assert_eq!(o.all::<String>("hostfwd").unwrap(), ["a", "b"]);
        assert_eq!(
            Options::parse_spec("net", "mac=m", spec).unwrap().kind(),
            None
        );
        let e = Options::parse_spec("net", "slirp,mac=m", spec).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown net kind 'slirp' (expected user, tap)"
        );
        let e = Options::parse_spec("net", "mac=a,user", spec).unwrap_err();
        assert!(matches!(e, OptionError::NotKeyValue { .. }), "{e}");
        let e = Options::parse_spec("net", "mac=a,mac=b", spec).unwrap_err();
        assert_eq!(e.to_string(), "net option 'mac' is given twice");
    }
}
