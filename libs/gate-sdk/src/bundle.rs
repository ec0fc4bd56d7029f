//! Offline bundles: verification (signature, key, gate, expiry) and the
//! offline decision a gate makes from a verified bundle (R15).

use estate_proto::common::CredentialKind;
use estate_proto::gate::{BundleContents, BundleEntry, BundleKeys, GateChange, OfflineBundle, Reason};
use prost::Message;
use std::collections::HashMap;

/// Why a bundle is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Signed by a key the gate does not trust.
    #[error("the bundle is signed by an unknown key ({0})")]
    UnknownKey(String),
    /// The signature does not match the contents (forged or tampered).
    #[error("the bundle signature does not verify")]
    BadSignature,
    /// The contents are not a bundle.
    #[error("the bundle contents cannot be decoded")]
    Malformed,
    /// A format this SDK does not know.
    #[error("bundle format {0} is not supported")]
    UnsupportedFormat(u32),
    /// Made for another gate.
    #[error("the bundle was made for another gate")]
    OtherGate,
    /// Past its expiry.
    #[error("the bundle expired")]
    Expired,
}

/// The keys a gate trusts for bundles: key id -> Ed25519 public key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys(HashMap<String, [u8; 32]>);

impl TrustedKeys {
    /// From the mesh's published keys; malformed keys are skipped.
    pub fn from_proto(keys: &BundleKeys) -> Self {
        Self(
            keys.keys
                .iter()
                .filter_map(|k| Some((k.key_id.clone(), <[u8; 32]>::try_from(k.public_key.as_slice()).ok()?)))
                .collect(),
        )
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks a bundle's key, signature, format and gate, without its expiry
/// (so that an expired bundle can still be inspected).
pub fn verify_signed(
    bundle: &OfflineBundle,
    keys: &TrustedKeys,
    gate_id: Option<&str>,
) -> Result<BundleContents, BundleError> {
    let key = keys.0.get(&bundle.key_id).ok_or_else(|| BundleError::UnknownKey(bundle.key_id.clone()))?;
    if !estate_crypto::verify_signature(key, &bundle.contents, &bundle.signature) {
        return Err(BundleError::BadSignature);
    }
    let contents = BundleContents::decode(bundle.contents.as_slice()).map_err(|_| BundleError::Malformed)?;
    if contents.format != 1 {
        return Err(BundleError::UnsupportedFormat(contents.format));
    }
    if contents.hash_key.len() != 32 {
        return Err(BundleError::Malformed);
    }
    if gate_id.is_some_and(|g| g != contents.gate_id) {
        return Err(BundleError::OtherGate);
    }
    Ok(contents)
}

/// [`verify_signed`], and refuses a bundle at or past its expiry.
pub fn verify(
    bundle: &OfflineBundle,
    keys: &TrustedKeys,
    gate_id: Option<&str>,
    now_ms: i64,
) -> Result<BundleContents, BundleError> {
    let contents = verify_signed(bundle, keys, gate_id)?;
    if now_ms >= contents.expires_at_ms {
        return Err(BundleError::Expired);
    }
    Ok(contents)
}

/// What a gate presents.
#[derive(Debug, Clone, PartialEq)]
pub enum Presented {
    /// A card read by the reader.
    Card {
        /// UID.
        uid: String,
        /// Facility code, if the card has one.
        facility_code: String,
    },
    /// A PIN typed for a unit.
    Pin {
        /// Unit id.
        unit_id: String,
        /// The digits.
        pin: String,
    },
    /// A QR code's text.
    Qr(String),
    /// A visitor pass code.
    Visitor(String),
    /// A face template extracted on the terminal.
    FaceTemplate(Vec<f32>),
}

/// A verified bundle and what the gate learned since it was made.
#[derive(Debug, Clone)]
pub struct LocalView {
    /// The bundle.
    pub contents: BundleContents,
    index: HashMap<(i32, String), usize>,
    /// Changes heard on the stream since: credential id -> (status, version).
    pub changes: HashMap<String, (i32, i64)>,
    /// Visitor entries used offline with this bundle: credential id -> count.
    pub visitor_used: HashMap<String, i32>,
}

impl LocalView {
    /// Indexes a verified bundle.
    pub fn new(contents: BundleContents) -> Self {
        let index =
            contents.entries.iter().enumerate().map(|(i, e)| ((e.kind, e.hash.clone()), i)).collect::<HashMap<_, _>>();
        Self { contents, index, changes: HashMap::new(), visitor_used: HashMap::new() }
    }

    /// Applies a change heard on the WatchChanges stream.
    pub fn apply(&mut self, change: &GateChange) {
        if change.credential_id.is_empty() {
            return;
        }
        let newer = self.changes.get(&change.credential_id).is_none_or(|(_, v)| change.version > *v);
        if newer {
            self.changes.insert(change.credential_id.clone(), (change.status, change.version));
        }
    }

    fn find(&self, kind: CredentialKind, hash: &str) -> Option<&BundleEntry> {
        self.index.get(&(kind as i32, hash.to_owned())).and_then(|i| self.contents.entries.get(*i))
    }

    /// The offline decision for `presented` at `now_ms`: (reason, entry).
    /// Consumes a visitor entry when admitted.
    pub fn decide(&mut self, presented: &Presented, now_ms: i64) -> (Reason, Option<BundleEntry>) {
        if now_ms >= self.contents.expires_at_ms {
            return (Reason::OfflineNoBundle, None);
        }
        let key: [u8; 32] = match <[u8; 32]>::try_from(self.contents.hash_key.as_slice()) {
            Ok(k) => k,
            Err(_) => return (Reason::OfflineNoBundle, None),
        };
        let (kind, label, normalised) = match presented {
            Presented::Card { uid, facility_code } => {
                (CredentialKind::Card, "card", estate_crypto::normalise_card(uid, facility_code))
            }
            Presented::Visitor(code) => {
                (CredentialKind::Visitor, "visitor", estate_crypto::normalise_visitor_code(code))
            }
            Presented::Pin { .. } | Presented::Qr(_) => return (Reason::OfflineUnsupported, None),
            Presented::FaceTemplate(_) => return (Reason::FaceUnavailable, None),
        };
        if !self.contents.accepted_kinds.contains(&(kind as i32)) {
            return (Reason::KindNotAccepted, None);
        }
        let Some(normalised) = normalised else { return (Reason::Unknown, None) };
        let hash = estate_crypto::offline_hash(&key, label, &normalised);
        let Some(entry) = self.find(kind, &hash).cloned() else { return (Reason::Unknown, None) };
        if let Some((status, version)) = self.changes.get(&entry.credential_id)
            && *version > entry.credential_version
        {
            use estate_proto::credentials::CredentialStatus;
            match CredentialStatus::try_from(*status).unwrap_or(CredentialStatus::Revoked) {
                CredentialStatus::Active => {}
                CredentialStatus::Suspended => return (Reason::Suspended, Some(entry)),
                _ => return (Reason::Revoked, Some(entry)),
            }
        }
        if now_ms < entry.valid_from_ms {
            return (Reason::NotYetValid, Some(entry));
        }
        if entry.valid_until_ms != 0 && now_ms >= entry.valid_until_ms {
            return (Reason::Expired, Some(entry));
        }
        if kind == CredentialKind::Visitor {
            let used = self.visitor_used.entry(entry.credential_id.clone()).or_insert(0);
            if *used >= entry.entries_left {
                return (Reason::Exhausted, Some(entry));
            }
            *used += 1;
        }
        (Reason::Ok, Some(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estate_proto::gate::BundleKey;

    fn signed(contents: &BundleContents, key: &estate_crypto::SigningKeyPair) -> OfflineBundle {
        let bytes = contents.encode_to_vec();
        OfflineBundle { signature: key.sign(&bytes).to_vec(), contents: bytes, key_id: key.key_id().to_owned() }
    }

    fn keys_of(key: &estate_crypto::SigningKeyPair) -> TrustedKeys {
        TrustedKeys::from_proto(&BundleKeys {
            keys: vec![BundleKey { key_id: key.key_id().to_owned(), public_key: key.public_key_bytes().to_vec() }],
        })
    }

    fn sample() -> BundleContents {
        let hash_key = [7u8; 32];
        BundleContents {
            format: 1,
            gate_id: "g".into(),
            version: 1,
            expires_at_ms: 10_000,
            hash_key: hash_key.to_vec(),
            accepted_kinds: vec![CredentialKind::Card as i32, CredentialKind::Visitor as i32],
            entries: vec![BundleEntry {
                credential_id: "c1".into(),
                kind: CredentialKind::Card as i32,
                hash: estate_crypto::offline_hash(
                    &hash_key,
                    "card",
                    &estate_crypto::normalise_card("04A1B2", "").unwrap_or_default(),
                ),
                credential_version: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn tampered_forged_and_expired_bundles_are_refused() {
        let key = estate_crypto::SigningKeyPair::from_seed([1; 32]);
        let other = estate_crypto::SigningKeyPair::from_seed([2; 32]);
        let keys = keys_of(&key);
        let good = signed(&sample(), &key);
        assert!(verify(&good, &keys, Some("g"), 0).is_ok());
        let mut tampered = good.clone();
        if let Some(b) = tampered.contents.last_mut() {
            *b ^= 1;
        }
        assert_eq!(verify(&tampered, &keys, Some("g"), 0).err(), Some(BundleError::BadSignature));
        let mut forged = signed(&sample(), &other);
        assert!(matches!(verify(&forged, &keys, Some("g"), 0), Err(BundleError::UnknownKey(_))));
        forged.key_id = key.key_id().to_owned();
        assert_eq!(verify(&forged, &keys, Some("g"), 0).err(), Some(BundleError::BadSignature));
        assert_eq!(verify(&good, &keys, Some("h"), 0).err(), Some(BundleError::OtherGate));
        assert_eq!(verify(&good, &keys, Some("g"), 10_000).err(), Some(BundleError::Expired));
    }

    #[test]
    fn offline_decisions_follow_the_bundle_and_later_changes() {
        let mut view = LocalView::new(sample());
        let card = Presented::Card { uid: "04:a1:b2".into(), facility_code: String::new() };
        assert_eq!(view.decide(&card, 1).0, Reason::Ok);
        let other = Presented::Card { uid: "FFFF".into(), facility_code: String::new() };
        assert_eq!(view.decide(&other, 1).0, Reason::Unknown);
        assert_eq!(view.decide(&Presented::Qr("EM1.x.y".into()), 1).0, Reason::OfflineUnsupported);
        view.apply(&GateChange {
            credential_id: "c1".into(),
            status: estate_proto::credentials::CredentialStatus::Revoked as i32,
            version: 2,
            ..Default::default()
        });
        assert_eq!(view.decide(&card, 1).0, Reason::Revoked);
        assert_eq!(view.decide(&card, 10_000).0, Reason::OfflineNoBundle);
    }
}
