//! The i8042 keyboard controller (in progress).
