//! Audit export bundles (R12) and their offline verification.
//!
//! A bundle is a JSON Lines file. Each line is an object with a `type`
//! (`manifest`, `entry`, `consistency`, `checkpoint`, `summary`), a few
//! readable fields for people, and `record`: the base64 of the protobuf
//! `estate.audit.v1.ExportRecord`. Only `record` is trusted. The verifier
//! needs nothing but the bundle and the audit service's public key:
//!
//! - the checkpoint's Ed25519 signature is valid (a forged checkpoint fails);
//! - the signed summary names the same tree, the number of entries and a hash
//!   of their indexes (a removed or inserted line fails);
//! - each entry's leaf hash has a valid inclusion proof at its index in the
//!   checkpoint's tree (a changed or moved entry fails);
//! - entries are in increasing index order and consecutive entries chain;
//! - with a previous bundle, a consistency proof shows the log only grew.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use estate_crypto::{SigningKeyPair, verify_signature};
use estate_merkle::{Hash, leaf_hash, verify_consistency, verify_inclusion};
use estate_proto::audit::{
    Checkpoint, ExportRecord, ExportSummary, SignedCheckpoint, SignedSummary, export_record::Record,
};
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, Write};

/// Domain of checkpoint signatures.
pub const CHECKPOINT_DOMAIN: &[u8] = b"estate.audit.checkpoint.v1\0";
/// Domain of export summary signatures.
pub const SUMMARY_DOMAIN: &[u8] = b"estate.audit.export.v1\0";
/// Bundle format number.
pub const FORMAT: u32 = 1;

fn domain(d: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = d.to_vec();
    m.extend_from_slice(body);
    m
}

/// Signs a checkpoint.
pub fn sign_checkpoint(key: &SigningKeyPair, c: &Checkpoint) -> SignedCheckpoint {
    let bytes = c.encode_to_vec();
    let signature = key.sign(&domain(CHECKPOINT_DOMAIN, &bytes)).to_vec();
    SignedCheckpoint { checkpoint: bytes, key_id: key.key_id().to_owned(), signature, decoded: Some(c.clone()) }
}

/// Signs an export summary.
pub fn sign_summary(key: &SigningKeyPair, s: &ExportSummary) -> SignedSummary {
    let bytes = s.encode_to_vec();
    let signature = key.sign(&domain(SUMMARY_DOMAIN, &bytes)).to_vec();
    SignedSummary { summary: bytes, key_id: key.key_id().to_owned(), signature }
}

/// SHA-256 over indexes as 8 big-endian bytes each, hex.
pub fn indexes_digest(indexes: impl IntoIterator<Item = i64>) -> String {
    let mut h = Sha256::new();
    for i in indexes {
        h.update(i.to_be_bytes());
    }
    hex::encode(h.finalize())
}

/// The chain value after `leaf`: H(previous chain || leaf).
pub fn chain_next(previous: &Hash, leaf: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(previous);
    h.update(leaf);
    h.finalize().into()
}

/// Writes one record as a bundle line.
pub fn write_record(out: &mut impl Write, record: &ExportRecord) -> std::io::Result<()> {
    let mut line = serde_json::Map::new();
    let kind = match &record.record {
        Some(Record::Manifest(m)) => {
            line.insert("tenant_id".into(), m.tenant_id.clone().into());
            line.insert("tree_size".into(), m.tree_size.into());
            "manifest"
        }
        Some(Record::Entry(e)) => {
            if let Some(entry) = &e.entry {
                line.insert("index".into(), entry.index.into());
                if let Some(d) = &entry.decoded {
                    line.insert("action".into(), d.action.clone().into());
                    line.insert("person".into(), d.person_pseudonym.clone().into());
                }
            }
            "entry"
        }
        Some(Record::Checkpoint(_)) => "checkpoint",
        Some(Record::Consistency(_)) => "consistency",
        Some(Record::Summary(_)) => "summary",
        None => "empty",
    };
    line.insert("type".into(), kind.into());
    line.insert("record".into(), B64.encode(record.encode_to_vec()).into());
    serde_json::to_writer(&mut *out, &serde_json::Value::Object(line))?;
    out.write_all(b"\n")
}

/// Why a bundle failed verification; names the line (1-based) and index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A line is not a bundle record.
    #[error("line {line}: not a bundle record ({reason})")]
    Malformed { line: usize, reason: String },
    /// The bundle lacks a part.
    #[error("the bundle has no {0}")]
    Missing(&'static str),
    /// The checkpoint signature is invalid or by an unknown key.
    #[error("the checkpoint signature is not valid for the given public key: forged or altered checkpoint")]
    ForgedCheckpoint,
    /// The summary signature is invalid or by an unknown key.
    #[error("the export summary signature is not valid: the bundle was altered")]
    ForgedSummary,
    /// The summary and the entries disagree.
    #[error(
        "the bundle holds {found} entries with indexes not matching the signed summary ({expected} expected): an entry was removed, inserted or reordered"
    )]
    EntrySetChanged { expected: i64, found: i64 },
    /// An entry is not in the checkpointed log as given.
    #[error("line {line}: entry {index} is not in the signed log as given: it was changed, moved or inserted")]
    NotIncluded { line: usize, index: i64 },
    /// Entries out of order.
    #[error("line {line}: entry {index} comes after entry {previous}: entries were reordered")]
    OutOfOrder { line: usize, index: i64, previous: i64 },
    /// Consecutive entries do not chain.
    #[error("line {line}: entry {index} does not chain to entry {previous}")]
    BrokenChain { line: usize, index: i64, previous: i64 },
    /// The log did not only grow since the previous bundle.
    #[error("the log since the previous export is not an extension of it: history was rewritten")]
    Inconsistent,
}

/// What a valid bundle showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Tenant of the log.
    pub tenant_id: String,
    /// Entries checked.
    pub entries: usize,
    /// Size and root of the checkpointed tree.
    pub tree_size: i64,
    /// Root hash, hex.
    pub root_hash: String,
    /// Whether a consistency proof with a previous bundle was checked.
    pub consistency_checked: bool,
}

/// A parsed bundle.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    records: Vec<(usize, ExportRecord)>,
}

impl Bundle {
    /// Reads a bundle from JSON Lines.
    pub fn read(input: impl BufRead) -> Result<Self, VerifyError> {
        let mut records = Vec::new();
        for (i, line) in input.lines().enumerate() {
            let n = i + 1;
            let line = line.map_err(|e| VerifyError::Malformed { line: n, reason: e.to_string() })?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| VerifyError::Malformed { line: n, reason: e.to_string() })?;
            let b64 = v
                .get("record")
                .and_then(|r| r.as_str())
                .ok_or_else(|| VerifyError::Malformed { line: n, reason: "no record field".into() })?;
            let bytes = B64.decode(b64).map_err(|e| VerifyError::Malformed { line: n, reason: e.to_string() })?;
            let rec = ExportRecord::decode(bytes.as_slice())
                .map_err(|e| VerifyError::Malformed { line: n, reason: e.to_string() })?;
            records.push((n, rec));
        }
        Ok(Self { records })
    }

    fn checkpoint(&self) -> Option<&SignedCheckpoint> {
        self.records.iter().find_map(|(_, r)| match &r.record {
            Some(Record::Checkpoint(c)) => Some(c),
            _ => None,
        })
    }

    /// Verifies the bundle with `keys` (key id → public key), and, when
    /// given, its consistency with `previous`.
    pub fn verify(&self, keys: &HashMap<String, [u8; 32]>, previous: Option<&Bundle>) -> Result<Verified, VerifyError> {
        let signed = self.checkpoint().ok_or(VerifyError::Missing("checkpoint"))?;
        let checkpoint = verified_checkpoint(signed, keys)?;
        let root = hex_hash(&checkpoint.root_hash).ok_or(VerifyError::ForgedCheckpoint)?;
        let summary_signed = self
            .records
            .iter()
            .find_map(|(_, r)| match &r.record {
                Some(Record::Summary(s)) => Some(s),
                _ => None,
            })
            .ok_or(VerifyError::Missing("signed summary"))?;
        let key = keys.get(&summary_signed.key_id).ok_or(VerifyError::ForgedSummary)?;
        if !verify_signature(key, &domain(SUMMARY_DOMAIN, &summary_signed.summary), &summary_signed.signature) {
            return Err(VerifyError::ForgedSummary);
        }
        let summary =
            ExportSummary::decode(summary_signed.summary.as_slice()).map_err(|_| VerifyError::ForgedSummary)?;
        if summary.tree_size != checkpoint.tree_size || summary.tenant_id != checkpoint.tenant_id {
            return Err(VerifyError::ForgedSummary);
        }

        let entries: Vec<(usize, &estate_proto::audit::ExportedEntry)> = self
            .records
            .iter()
            .filter_map(|(n, r)| match &r.record {
                Some(Record::Entry(e)) => Some((*n, e)),
                _ => None,
            })
            .collect();
        let found = i64::try_from(entries.len()).unwrap_or(i64::MAX);
        let digest = indexes_digest(entries.iter().map(|(_, e)| e.entry.as_ref().map_or(-1, |x| x.index)));
        if found != summary.entry_count || digest != summary.indexes_sha256 {
            return Err(VerifyError::EntrySetChanged { expected: summary.entry_count, found });
        }
        let size = u64::try_from(checkpoint.tree_size).map_err(|_| VerifyError::ForgedCheckpoint)?;
        let mut previous_entry: Option<(i64, Hash)> = None;
        for (line, e) in &entries {
            let entry = e.entry.as_ref().ok_or(VerifyError::Malformed { line: *line, reason: "empty entry".into() })?;
            let index = entry.index;
            let leaf = leaf_hash(&entry.event);
            let proof: Option<Vec<Hash>> = e.inclusion_proof.iter().map(|p| hex_hash(p)).collect();
            let included = match (u64::try_from(index), proof) {
                (Ok(i), Some(proof)) => verify_inclusion(i, size, &leaf, &proof, &root),
                _ => false,
            };
            if !included {
                return Err(VerifyError::NotIncluded { line: *line, index });
            }
            let chain = hex_hash(&entry.chain_hash).ok_or(VerifyError::NotIncluded { line: *line, index })?;
            if let Some((prev_index, prev_chain)) = previous_entry {
                if index <= prev_index {
                    return Err(VerifyError::OutOfOrder { line: *line, index, previous: prev_index });
                }
                if index == prev_index + 1 && chain_next(&prev_chain, &leaf) != chain {
                    return Err(VerifyError::BrokenChain { line: *line, index, previous: prev_index });
                }
            }
            if index == checkpoint.tree_size - 1 && entry.chain_hash != checkpoint.chain_hash {
                return Err(VerifyError::BrokenChain { line: *line, index, previous: index - 1 });
            }
            previous_entry = Some((index, chain));
        }

        let mut consistency_checked = false;
        if let Some(prev) = previous {
            let prev_signed = prev.checkpoint().ok_or(VerifyError::Missing("checkpoint in the previous bundle"))?;
            let prev_cp = verified_checkpoint(prev_signed, keys)?;
            let prev_root = hex_hash(&prev_cp.root_hash).ok_or(VerifyError::ForgedCheckpoint)?;
            let ok = if prev_cp.tree_size == checkpoint.tree_size {
                prev_root == root
            } else {
                let proof = self
                    .records
                    .iter()
                    .find_map(|(_, r)| match &r.record {
                        Some(Record::Consistency(c)) if c.first_tree_size == prev_cp.tree_size => Some(c),
                        _ => None,
                    })
                    .ok_or(VerifyError::Missing("consistency proof from the previous export's tree size"))?;
                let hashes: Option<Vec<Hash>> = proof.proof.iter().map(|p| hex_hash(p)).collect();
                match (hashes, u64::try_from(prev_cp.tree_size)) {
                    (Some(h), Ok(first)) => verify_consistency(first, size, &prev_root, &root, &h),
                    _ => false,
                }
            };
            if !ok || prev_cp.tenant_id != checkpoint.tenant_id {
                return Err(VerifyError::Inconsistent);
            }
            consistency_checked = true;
        }
        Ok(Verified {
            tenant_id: checkpoint.tenant_id,
            entries: entries.len(),
            tree_size: checkpoint.tree_size,
            root_hash: checkpoint.root_hash,
            consistency_checked,
        })
    }
}

fn verified_checkpoint(signed: &SignedCheckpoint, keys: &HashMap<String, [u8; 32]>) -> Result<Checkpoint, VerifyError> {
    let key = keys.get(&signed.key_id).ok_or(VerifyError::ForgedCheckpoint)?;
    if !verify_signature(key, &domain(CHECKPOINT_DOMAIN, &signed.checkpoint), &signed.signature) {
        return Err(VerifyError::ForgedCheckpoint);
    }
    Checkpoint::decode(signed.checkpoint.as_slice()).map_err(|_| VerifyError::ForgedCheckpoint)
}

fn hex_hash(s: &str) -> Option<Hash> {
    hex::decode(s).ok().and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
}

/// Parses a key file: lines of "key_id hex_public_key" (as `meshctl audit keys` prints).
pub fn parse_keys(text: &str) -> Result<HashMap<String, [u8; 32]>, String> {
    let keys: HashMap<String, [u8; 32]> = estate_crypto::key_list::parse(text)?.into_iter().collect();
    if keys.is_empty() {
        return Err("the key file holds no key".into());
    }
    Ok(keys)
}
