//! Shared setup for the end-to-end tests (see estate_test_support::fixtures).
#![allow(unused_imports)]

pub use estate_test_support::fixtures::*;

pub mod raw;
