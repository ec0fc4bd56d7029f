//! Deletion certificates (R6): signing and the offline verifier live in
//! `estate-attestation` (with the other signed statements), so that
//! `meshctl` and the fuzzer use them without facematch.

pub use estate_attestation::certificate::*;
