-- The signed deletion certificate facematch returned (R6), kept so that the
-- person can fetch it: the encoded estate.facematch.v1.DeletionCertificate,
-- base64. It names a pseudonym and counts, never face data.
ALTER TABLE face_deletion_requests ADD COLUMN certificate TEXT;
