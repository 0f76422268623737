//! block (work in progress)
