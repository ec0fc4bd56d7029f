-- Offline bundles (R15): each (credential, estate) holds the hash of the card
-- or visitor code under that estate's offline key, so a gate can check a card
-- without the mesh and without the tenant-wide lookup key. NULL for kinds that
-- never go offline (PIN, QR, face).
ALTER TABLE credential_estates ADD COLUMN offline_hash TEXT;
