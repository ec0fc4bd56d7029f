//! Requests as a gate or a resident sends them, before any database is
//! touched: the protobuf decoding tonic does for each handler, then the pure
//! checks the handlers run on the decoded input (card and visitor-code
//! normalisation, face probes and templates). A decoded message must
//! re-encode to bytes that decode to a message of the same size. The
//! database-backed part of each handler is covered by the end-to-end suites
//! (tests/tests/abuse.rs, gate.rs, limits.rs), not here.
#![no_main]
use estate_proto::consent::{GrantConsentRequest, IssueAttestationRequest, WithdrawConsentRequest};
use estate_proto::credentials::{VerifyCredentialRequest, verify_credential_request};
use estate_proto::facematch::EnrolRequest;
use estate_proto::gate::{AckBundleRequest, DecideRequest, UploadOfflineDecisionsRequest, decide_request};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Decodes; a decoded message must re-encode to bytes that decode again to
/// a message of the same encoded size (sizes, not equality: NaN floats are
/// never equal, and map fields encode in no fixed order).
fn round_trip<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("a decoded message re-encodes to valid bytes");
    assert_eq!(again.encoded_len(), m.encoded_len(), "re-encoding changed the message");
    Some(m)
}

fn card(uid: &str, facility: &str) {
    if let Some(n) = estate_crypto::normalise_card(uid, facility) {
        assert!(n.len() <= 64 && n.is_ascii(), "normalised card {n:?}");
        assert_eq!(estate_crypto::normalise_card(&n, ""), estate_crypto::normalise_card(&n, ""));
    }
}

fn face(template: &[f32], image: &[u8]) {
    let _ = estate_face_input::pixels(image, 112);
    if let Some(unit) = estate_face_input::normalised(template) {
        let norm: f32 = unit.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "normalised template has norm {norm}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 8 {
        0 => {
            if let Some(r) = round_trip::<DecideRequest>(body) {
                match r.presented {
                    Some(decide_request::Presented::Card(c)) => card(&c.uid, &c.facility_code),
                    Some(decide_request::Presented::Visitor(v)) => {
                        if let Some(code) = estate_crypto::normalise_visitor_code(&v.code) {
                            assert!(!code.is_empty() && code.len() <= 64);
                        }
                    }
                    Some(decide_request::Presented::Face(f)) => face(&f.template, &f.image),
                    _ => {}
                }
            }
        }
        1 => {
            if let Some(r) = round_trip::<VerifyCredentialRequest>(body)
                && let Some(verify_credential_request::Presented::Card(c)) = r.presented
            {
                card(&c.uid, &c.facility_code);
            }
        }
        2 => {
            let _ = round_trip::<UploadOfflineDecisionsRequest>(body);
        }
        3 => {
            let _ = round_trip::<AckBundleRequest>(body);
        }
        4 => {
            let _ = round_trip::<GrantConsentRequest>(body);
        }
        5 => {
            let _ = round_trip::<IssueAttestationRequest>(body);
        }
        6 => {
            let _ = round_trip::<WithdrawConsentRequest>(body);
        }
        _ => {
            if let Some(r) = round_trip::<EnrolRequest>(body)
                && let Some(f) = r.face
            {
                face(&f.template, &f.image);
            }
        }
    }
});
