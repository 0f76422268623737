//! The front end: guest code to the form the interpreter and the translator
//! run. [`decode`] cuts guest code into basic blocks (iced-x86), cached by
//! physical address and dropped when their pages are written; [`uop`] is the
//! compact per-instruction form with pre-resolved operands and a handler
//! per hot instruction form.

pub mod decode;
pub mod uop;
