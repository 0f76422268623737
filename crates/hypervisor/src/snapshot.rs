//! What the seam carries of a backend's saved state.
//!
//! Each backend owns the form of its own state (KVM's in [`crate::kvm`], the
//! software engine's in the `emu` crate) and this crate never looks inside:
//! a [`VcpuSnapshot`] or [`VmSnapshot`] is an accelerator tag plus the
//! backend's state as serde data. The backend that restores it decodes it
//! with [`VcpuSnapshot::decode`], which refuses state made by another
//! accelerator and state of the wrong shape, and then checks what the shape
//! alone cannot say before any of it reaches a live vCPU or device model.
//!
//! On disk (the snapshot manifest, the migration stream) each is one JSON
//! object: `"backend": "kvm" | "emu"` beside the backend's own fields, as the
//! tagged enum that carried them before had it, so older files still load.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::AccelKind;

/// The key naming the accelerator in a saved state's object.
const TAG: &str = "backend";

/// Why saved backend state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "snapshot {what} was made under --accel {made_by}; it cannot be restored under --accel {here}"
    )]
    WrongAccel {
        what: &'static str,
        made_by: AccelKind,
        here: AccelKind,
    },
    /// Not the backend's state form (a damaged or foreign file), or a state
    /// that does not serialize to a JSON object.
    #[error("snapshot {what} is not --accel {accel} state: {source}")]
    Malformed {
        what: &'static str,
        accel: AccelKind,
        #[source]
        source: serde_json::Error,
    },
    /// Well-formed, but the backend refuses it (its own typed error says why).
    #[error("snapshot {what}: {source}")]
    Invalid {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The accelerator tag and the backend's fields, shared by both snapshot kinds.
#[derive(Debug, Clone, PartialEq)]
struct Tagged {
    accel: AccelKind,
    fields: Map<String, Value>,
}

impl Tagged {
    fn new<T: Serialize>(
        what: &'static str,
        accel: AccelKind,
        state: &T,
    ) -> Result<Self, StateError> {
        let malformed = |source| StateError::Malformed {
            what,
            accel,
            source,
        };
        match serde_json::to_value(state).map_err(malformed)? {
            Value::Object(mut fields) => {
                // The tag is ours; a backend field of that name would be lost.
                if fields.remove(TAG).is_some() {
                    return Err(malformed(serde::ser::Error::custom(format!(
                        "a backend state may not have a field named {TAG:?}"
                    ))));
                }
                Ok(Tagged { accel, fields })
            }
            other => Err(malformed(serde::ser::Error::custom(format!(
                "a backend state must be a JSON object, not {other}"
            )))),
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        what: &'static str,
        here: AccelKind,
    ) -> Result<T, StateError> {
        if self.accel != here {
            return Err(StateError::WrongAccel {
                what,
                made_by: self.accel,
                here,
            });
        }
        serde_json::from_value(Value::Object(self.fields.clone())).map_err(|source| {
            StateError::Malformed {
                what,
                accel: here,
                source,
            }
        })
    }

    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.fields.len() + 1))?;
        m.serialize_entry(TAG, &self.accel)?;
        for (k, v) in &self.fields {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }

    fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = Map::<String, Value>::deserialize(d)?;
        let tag = fields
            .remove(TAG)
            .ok_or_else(|| D::Error::missing_field(TAG))?;
        let accel = AccelKind::deserialize(tag).map_err(D::Error::custom)?;
        Ok(Tagged { accel, fields })
    }
}

macro_rules! backend_state {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name(Tagged);

        impl $name {
            /// Wrap a backend's own state form (it must serialize to a JSON
            /// object without a `backend` field).
            pub fn new<T: Serialize>(accel: AccelKind, state: &T) -> Result<Self, StateError> {
                Tagged::new($what, accel, state).map($name)
            }

            /// The accelerator that made it.
            pub fn accel(&self) -> AccelKind {
                self.0.accel
            }

            /// The backend's state form, for the backend `here`: refused if
            /// another accelerator made it or its fields do not fit `T`.
            pub fn decode<T: DeserializeOwned>(&self, here: AccelKind) -> Result<T, StateError> {
                self.0.decode($what, here)
            }

            /// An error about this state that the backend found after decoding.
            pub fn invalid(
                source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
            ) -> StateError {
                StateError::Invalid {
                    what: $what,
                    source: source.into(),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Tagged::deserialize(d).map($name)
            }
        }
    };
}

backend_state!(
    /// A vCPU's complete state as its backend keeps it (for snapshots and
    /// migration). Restoring needs the same backend kind, or a conversion
    /// by the code that knows both forms (`emu::convert`).
    VcpuSnapshot,
    "vCPU state"
);

backend_state!(
    /// A VM's backend-held state beyond its vCPUs (interrupt controllers,
    /// timers, clock).
    VmSnapshot,
    "VM state"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        rip: u64,
        halted: bool,
    }

    #[test]
    fn the_tag_sits_beside_the_backend_fields_and_round_trips() {
        let p = Probe {
            rip: u64::MAX,
            halted: true,
        };
        let s = VcpuSnapshot::new(AccelKind::Emu, &p).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"backend":"emu","halted":true,"rip":18446744073709551615}"#
        );
        let back: VcpuSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.accel(), AccelKind::Emu);
        assert_eq!(back.decode::<Probe>(AccelKind::Emu).unwrap(), p);
    }

    #[test]
    fn state_of_another_accelerator_or_shape_is_refused() {
        let s = VmSnapshot::new(
            AccelKind::Kvm,
            &Probe {
                rip: 1,
                halted: false,
            },
        )
        .unwrap();
        let e = s.decode::<Probe>(AccelKind::Emu).unwrap_err().to_string();
        assert!(e.contains("made under --accel kvm"), "{e}");
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Other {
            lapic: u8,
        }
        let e = s.decode::<Other>(AccelKind::Kvm).unwrap_err().to_string();
        assert!(
            e.contains("not --accel kvm state") && e.contains("lapic"),
            "{e}"
        );
        let e = serde_json::from_str::<VmSnapshot>(r#"{"rip":1}"#).unwrap_err();
        assert!(e.to_string().contains("backend"), "{e}");
        let e = serde_json::from_str::<VmSnapshot>(r#"{"backend":"tcg"}"#).unwrap_err();
        assert!(e.to_string().contains("tcg"), "{e}");
        assert!(VmSnapshot::new(AccelKind::Kvm, &7u32).is_err());
    }
}
