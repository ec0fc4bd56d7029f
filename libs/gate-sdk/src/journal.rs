//! The on-disk journal of offline decisions: appended and synced before the
//! gate acts on a decision, uploaded on reconnect, never renumbered.
//!
//! Records are `[u32 length][OfflineDecision][4 bytes of SHA-256]`; a torn
//! record at the end (power lost mid-write) is dropped when the journal is
//! read. The highest uploaded sequence lives in `uploaded.seq`; the next
//! sequence is one more than the highest ever written or uploaded, so a
//! sequence is never reused even after the journal is compacted.

use estate_proto::gate::OfflineDecision;
use prost::Message;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const JOURNAL: &str = "journal.log";
const UPLOADED: &str = "uploaded.seq";

/// The journal in a state directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    records: Vec<OfflineDecision>,
    uploaded: i64,
}

fn checksum(bytes: &[u8]) -> [u8; 4] {
    let d = estate_crypto::sha256(bytes);
    [d[0], d[1], d[2], d[3]]
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Decodes journal records (length, body, checksum) from the start of
/// `bytes`, stopping at the first torn or corrupt one; returns them and the
/// length of the valid prefix. Never panics on any input (fuzzed).
pub fn parse_records(bytes: &[u8]) -> (Vec<OfflineDecision>, usize) {
    let mut records = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(end) = len.checked_add(8) else { break };
        let Some(body) = rest.get(4..4 + len) else { break };
        let Some(sum) = rest.get(4 + len..end) else { break };
        if checksum(body) != sum {
            break;
        }
        match OfflineDecision::decode(body) {
            Ok(d) => records.push(d),
            Err(_) => break,
        }
        rest = &rest[end..];
    }
    (records, bytes.len() - rest.len())
}

impl Journal {
    /// Opens (or starts) the journal in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let uploaded = match fs::read_to_string(dir.join(UPLOADED)) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let bytes = match fs::read(dir.join(JOURNAL)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let (records, valid) = parse_records(&bytes);
        let rest = &bytes[valid..];
        if !rest.is_empty() {
            // Drop the torn tail, so that later appends stay readable.
            OpenOptions::new().write(true).open(dir.join(JOURNAL))?.set_len(valid as u64)?;
        }
        Ok(Self { dir: dir.to_path_buf(), records, uploaded })
    }

    /// The sequence the next decision gets.
    pub fn next_sequence(&self) -> i64 {
        self.records.iter().map(|r| r.sequence).max().unwrap_or(0).max(self.uploaded) + 1
    }

    /// Appends `decision` and syncs it to disk.
    pub fn append(&mut self, decision: OfflineDecision) -> std::io::Result<()> {
        let body = decision.encode_to_vec();
        let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("decision too large"))?;
        let mut record = Vec::with_capacity(body.len() + 8);
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(&body);
        record.extend_from_slice(&checksum(&body));
        let mut f = OpenOptions::new().create(true).append(true).open(self.dir.join(JOURNAL))?;
        f.write_all(&record)?;
        f.sync_data()?;
        self.records.push(decision);
        Ok(())
    }

    /// Decisions not yet uploaded, oldest first.
    pub fn pending(&self) -> Vec<OfflineDecision> {
        self.records.iter().filter(|r| r.sequence > self.uploaded).cloned().collect()
    }

    /// Records that everything up to `sequence` is uploaded, and drops
    /// uploaded records from the journal.
    pub fn mark_uploaded(&mut self, sequence: i64) -> std::io::Result<()> {
        if sequence <= self.uploaded {
            return Ok(());
        }
        write_atomically(&self.dir.join(UPLOADED), sequence.to_string().as_bytes())?;
        self.uploaded = sequence;
        self.records.retain(|r| r.sequence > sequence);
        let mut bytes = Vec::new();
        for r in &self.records {
            let body = r.encode_to_vec();
            bytes.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(&checksum(&body));
        }
        write_atomically(&self.dir.join(JOURNAL), &bytes)
    }

    /// Highest uploaded sequence.
    pub fn uploaded(&self) -> i64 {
        self.uploaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_survive_reopening_compaction_and_torn_writes() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut j = Journal::open(dir.path())?;
        for _ in 0..3 {
            let sequence = j.next_sequence();
            j.append(OfflineDecision { sequence, ..Default::default() })?;
        }
        assert_eq!(j.next_sequence(), 4);
        j.mark_uploaded(2)?;
        let mut j = Journal::open(dir.path())?;
        assert_eq!(j.pending().iter().map(|d| d.sequence).collect::<Vec<_>>(), vec![3]);
        j.mark_uploaded(3)?;
        let mut j = Journal::open(dir.path())?;
        assert_eq!(j.next_sequence(), 4, "a sequence is never reused after compaction");
        j.append(OfflineDecision { sequence: 4, ..Default::default() })?;
        // A torn record at the end is dropped, the rest kept.
        let mut f = OpenOptions::new().append(true).open(dir.path().join(JOURNAL))?;
        f.write_all(&[0, 0, 0, 9, 1, 2])?;
        let mut j = Journal::open(dir.path())?;
        assert_eq!(j.pending().len(), 1);
        j.append(OfflineDecision { sequence: 5, ..Default::default() })?;
        assert_eq!(Journal::open(dir.path())?.pending().len(), 2, "appends after a torn record stay readable");
        Ok(())
    }
}
